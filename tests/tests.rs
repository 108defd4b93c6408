//! One integration-test binary; one module per area (ripgrep's layout).

mod retention;
mod snapshot;
mod util;
mod verify;
mod view;
