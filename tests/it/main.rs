mod bus;
mod compose;
mod e2e;
mod filter;
mod ingest;
mod lag;
mod support;
mod webhook;
