//! CPU time per role of a path (client node, each agent, backend), from each role's cgroup.
//!
//! A [`Roles`] names the cgroup v2 directories whose `cpu.stat` `usage_usec` counts one role
//! each (the subtrees must not overlap); [`Roles::usage_s`] reads them all at one moment, and
//! the difference of two readings over a run, divided by the run's units of work, is the CPU
//! each role spent per unit. This module knows nothing of the paths or the loads.

use std::path::PathBuf;

use anyhow::Result;

use crate::cpu::cgroup_usage_s;

/// One role and the cgroup that counts it.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: &'static str,
    pub cgroup: PathBuf,
}

/// The roles of one path, in the order of the table.
#[derive(Debug, Clone, Default)]
pub struct Roles(pub Vec<Role>);

impl Roles {
    /// Each role's CPU seconds since its cgroup was created, in order.
    pub fn usage_s(&self) -> Result<Vec<f64>> {
        self.0.iter().map(|r| cgroup_usage_s(&r.cgroup)).collect()
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|r| r.name)
    }

    /// Runs `work` and returns its result with each role's CPU seconds during it.
    pub fn measure<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Vec<f64>)> {
        let before = self.usage_s()?;
        let out = work()?;
        let after = self.usage_s()?;
        Ok((out, delta(&before, &after)))
    }
}

fn delta(before: &[f64], after: &[f64]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b).max(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_per_role_is_clamped_at_zero() {
        assert_eq!(delta(&[1.0, 2.0, 5.0], &[1.5, 2.0, 4.0]), [0.5, 0.0, 0.0]);
    }
}
