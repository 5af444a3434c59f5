mod bus;
mod compose;
mod e2e;
mod lag;
mod support;
