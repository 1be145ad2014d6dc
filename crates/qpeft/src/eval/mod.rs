pub mod perplexity;
