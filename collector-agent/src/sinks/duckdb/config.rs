//! DuckDB sink settings: see `crate::config::WarehouseConfig` (`[warehouse] path`).
pub use crate::config::WarehouseConfig as DuckDbConfig;
