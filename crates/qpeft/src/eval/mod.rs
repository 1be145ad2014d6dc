pub mod perplexity;
pub mod loglik;
pub mod mmlu;
