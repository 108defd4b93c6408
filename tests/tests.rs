//! One integration-test binary; one module per area (ripgrep's layout).

mod util;
mod view;
