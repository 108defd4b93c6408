//! One integration-test binary; one module per area (ripgrep's layout).

mod exit_codes;
mod hooks_db;
mod job;
mod ops;
mod ops_faults;
mod pull;
mod restore;
mod retention;
mod snapshot;
mod tamper;
mod tamper_raw;
mod util;
mod verify;
mod view;
mod zfs_raw;
