//! Audiences: named sets of people, defined in `audiences.toml` (see [`config`]) as a
//! declarative rule or SQL, compiled to each warehouse's dialect and evaluated there
//! ([`eval`]) after every load and on a schedule (`audience_interval_ms`, a minute by
//! default), so a person enters a time-window audience within a minute of qualifying.
//! Membership is materialised in `audience_membership` (`audience`, `person_id`,
//! `entered_at`, `exited_at`): one row per stay, so entries and exits are diffs.
//!
//! Windows are measured on event timestamps against the clock the evaluation is given
//! (the system clock in the agent, an injected one in tests). Members are people
//! (`profiles`); when two people merge, the merged-away `person_id` leaves its
//! audiences and the surviving one enters those it qualifies for. An audience removed
//! from the file keeps its rows as they were (nothing is exited on its behalf).

pub mod config;
pub mod eval;

use std::path::Path;

pub use config::{parse, Audience, Definition, FileError};
pub use eval::{ddl, evaluate, members_sql, Evaluation};

/// Reads and validates an audiences file (`categories`: privacy.toml's, when known);
/// `Err` carries every problem as `file:line:col: message`.
pub fn load(path: &Path, categories: Option<&[String]>) -> Result<Vec<Audience>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text, categories).map_err(|errs| {
        errs.iter()
            .map(|e| format!("{}:{e}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })
}
