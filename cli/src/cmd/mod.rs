//! One module per subcommand.

pub mod audit;
pub mod check;
pub mod checksum;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod measure;
pub mod ova;
pub mod upload;
