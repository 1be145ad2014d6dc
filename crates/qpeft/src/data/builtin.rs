//! Built-in tasks qpeft generates itself (deterministic from a seed), for the quickstart and for tests: skills a
//! small base model lacks and learns in minutes, judged by exact match of the greedy answer.
//!
//! `dates`: rewrite a spelled-out date ("March 7, 2021", "7 March 2021" or "Sunday, March 7, 2021") as ISO 8601
//! ("2021-03-07"). It needs the month-name → number mapping, zero padding and reordering, and has exactly one
//! right answer.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Example;
use crate::error::{Error, Result};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

pub const TASKS: [&str; 1] = ["dates"];

fn days_in(month: u32, year: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// 0 = Monday (Sakamoto's method on the proleptic Gregorian calendar).
fn weekday(year: u32, month: u32, day: u32) -> usize {
    const T: [u32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let y = if month < 3 { year - 1 } else { year };
    let sunday_based = (y + y / 4 - y / 100 + y / 400 + T[month as usize - 1] + day) % 7;
    (sunday_based as usize + 6) % 7
}

fn below(rng: &mut ChaCha8Rng, n: u32) -> u32 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u32
}

/// `n` examples of `task`, the same for the same seed.
pub fn generate(task: &str, n: usize, seed: u64) -> Result<Vec<Example>> {
    if task != "dates" {
        return Err(Error::Invalid(format!("unknown built-in task `{task}` (known: {})", TASKS.join(", "))));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let year = 1900 + below(&mut rng, 200);
            let month = 1 + below(&mut rng, 12);
            let day = 1 + below(&mut rng, days_in(month, year));
            let name = MONTHS[month as usize - 1];
            let spelled = match below(&mut rng, 3) {
                0 => format!("{name} {day}, {year}"),
                1 => format!("{day} {name} {year}"),
                _ => format!("{}, {name} {day}, {year}", WEEKDAYS[weekday(year, month, day)]),
            };
            Example {
                source: format!("Rewrite the date in ISO 8601 format (YYYY-MM-DD).\nDate: {spelled}\nISO date: "),
                target: format!("{year:04}-{month:02}-{day:02}"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_valid_and_seeded() {
        let a = generate("dates", 200, 1).unwrap();
        assert_eq!(a, generate("dates", 200, 1).unwrap());
        assert_ne!(a, generate("dates", 200, 2).unwrap());
        for ex in &a {
            let parts: Vec<u32> = ex.target.split('-').map(|p| p.parse().unwrap()).collect();
            assert!(parts[2] >= 1 && parts[2] <= days_in(parts[1], parts[0]), "{}", ex.target);
            assert!(ex.source.contains(MONTHS[parts[1] as usize - 1]));
        }
        assert!(generate("sums", 1, 0).is_err());
    }

    #[test]
    fn weekdays_match_the_calendar() {
        // 2000-01-01 was a Saturday, 2024-02-29 a Thursday, 1900-01-01 a Monday.
        assert_eq!(WEEKDAYS[weekday(2000, 1, 1)], "Saturday");
        assert_eq!(WEEKDAYS[weekday(2024, 2, 29)], "Thursday");
        assert_eq!(WEEKDAYS[weekday(1900, 1, 1)], "Monday");
    }
}
