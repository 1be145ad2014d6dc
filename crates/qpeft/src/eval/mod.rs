pub mod loglik;
pub mod mmlu;
pub mod perplexity;
pub mod prefix;
pub mod suite;
pub mod tasks;
pub mod zero_shot;
