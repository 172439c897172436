//! Integration tests: the real server on an ephemeral loopback port, real
//! HTTP clients, and the real binary for CLI, config and signal behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

mod abuse;
mod ai_sdk;
mod anthropic;
mod architecture;
mod auth;
pub mod binary;
pub mod browser;
mod channels;
mod cluster_limits;
mod cors;
pub mod dashboard;
mod fuzz_corpus;
mod helpers;
mod http1;
mod jwks;
mod lifecycle;
mod limits;
mod mock_upstream;
mod nginx;
mod observability;
mod openai_compat;
mod quotas;
pub mod redis;
mod redis_follow;
mod responses;
mod resume;
mod spec;
mod sse_props;
mod streaming;
mod tickets;
mod tls;
mod token_expiry;
mod unicode;
mod upstream;
