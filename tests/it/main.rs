mod bus;
mod compose;
mod e2e;
mod ingest;
mod lag;
mod support;
