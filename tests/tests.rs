//! One integration-test binary; one module per area (ripgrep's layout).

mod job;
mod ops;
mod ops_faults;
mod retention;
mod snapshot;
mod util;
mod verify;
mod view;
