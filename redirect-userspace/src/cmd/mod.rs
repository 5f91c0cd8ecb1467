//! One module per subcommand.
pub mod attach;
pub mod demo;
pub mod detach;
pub mod stats;
pub mod status;
pub mod uninstall;
pub mod validate;
