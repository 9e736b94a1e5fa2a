//! Writing a plan, one group at a time, each all-or-nothing up to its commit.
//!
//! Owns the failure policy described in the parent module: undo before the commit, warn after
//! it, and keep `state` equal to what the writer accepted.

use std::fmt;

use super::plan::{GroupKind, OpGroup, Plan};
use super::{KernelState, MapOp, MapWriteError, MapWriter};

/// What an [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub services_added: usize,
    pub services_changed: usize,
    pub services_removed: usize,
    /// Ops the writer accepted, undo ops included.
    pub ops_written: usize,
    /// Deletes that failed after their group's commit: garbage that nothing reads, retried by
    /// the next reconcile.
    pub warnings: Vec<ApplyWarning>,
}

impl ApplyReport {
    fn count(&mut self, kind: GroupKind) {
        match kind {
            GroupKind::AddService => self.services_added += 1,
            GroupKind::ChangeService => self.services_changed += 1,
            GroupKind::RemoveService => self.services_removed += 1,
            GroupKind::VipMarker | GroupKind::Cleanup | GroupKind::StrictBackends => {}
        }
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} services added, {} changed, {} removed; {} map writes",
            self.services_added, self.services_changed, self.services_removed, self.ops_written
        )?;
        if !self.warnings.is_empty() {
            write!(f, "; {} left as garbage", self.warnings.len())?;
        }
        Ok(())
    }
}

/// A delete that failed where failing is harmless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyWarning {
    pub subject: String,
    pub op: MapOp,
    pub cause: MapWriteError,
}

impl fmt::Display for ApplyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} failed: {} (unreferenced; retried on the next reconcile)",
            self.subject, self.op, self.cause
        )
    }
}

/// A group could not be applied. Its service keeps the state it had before the group (a new
/// one stays absent); groups before it stay applied, groups after it were not tried.
#[derive(Debug, thiserror::Error)]
#[error("{subject}: {op} failed: {cause}; {outcome}{}", undo_note(.undo_failures))]
pub struct ApplyError {
    /// The service (or VIP) of the failed group, e.g. `service "web" (10.96.0.10:80/tcp)`.
    pub subject: String,
    pub kind: GroupKind,
    pub op: MapOp,
    pub cause: MapWriteError,
    /// What stays in force, in words.
    pub outcome: &'static str,
    /// Puts of this group that could not be taken back (unreferenced; the next plan deletes
    /// them).
    pub undo_failures: Vec<ApplyWarning>,
    /// What was done before the failure.
    pub completed: ApplyReport,
}

fn undo_note(failures: &[ApplyWarning]) -> String {
    match failures.len() {
        0 => String::new(),
        n => format!(" ({n} unreferenced entries could not be removed and are retried on the next reconcile)"),
    }
}

/// Write `plan` through `writer`, recording every accepted op in `state`. (The error is boxed:
/// it carries the failed op and what was done before it.)
///
/// Stops at the first group that fails before (or at) its commit, after deleting the puts that
/// group made; see the parent module for why earlier groups stay.
pub fn apply(
    plan: &Plan,
    writer: &mut (impl MapWriter + ?Sized),
    state: &mut KernelState,
) -> Result<ApplyReport, Box<ApplyError>> {
    let mut report = ApplyReport::default();
    for group in &plan.groups {
        apply_group(group, writer, state, &mut report)?;
        report.count(group.kind);
    }
    Ok(report)
}

fn apply_group(
    group: &OpGroup,
    writer: &mut (impl MapWriter + ?Sized),
    state: &mut KernelState,
    report: &mut ApplyReport,
) -> Result<(), Box<ApplyError>> {
    let mut prepared: Vec<&MapOp> = Vec::new();
    for (i, op) in group.ops.iter().enumerate() {
        let committed = group.commit.is_none_or(|c| i > c);
        match writer.write(op) {
            Ok(()) => {
                state.record(op);
                report.ops_written += 1;
                if !committed {
                    prepared.push(op);
                }
            }
            Err(cause) if committed && op.is_delete() => report.warnings.push(ApplyWarning {
                subject: group.subject.clone(),
                op: *op,
                cause,
            }),
            Err(cause) => {
                let mut undo_failures = Vec::new();
                if !committed {
                    for undo in prepared.iter().rev().filter_map(|op| op.undo()) {
                        match writer.write(&undo) {
                            Ok(()) => {
                                state.record(&undo);
                                report.ops_written += 1;
                            }
                            Err(cause) => undo_failures.push(ApplyWarning {
                                subject: group.subject.clone(),
                                op: undo,
                                cause,
                            }),
                        }
                    }
                }
                let outcome = match (committed, group.kind) {
                    (true, _) => "the change is in force but incomplete",
                    (false, GroupKind::AddService) => "the service was not added",
                    (false, GroupKind::ChangeService) => "the service keeps its previous backends",
                    (false, GroupKind::RemoveService) => "the service stays",
                    (false, GroupKind::VipMarker) => {
                        "other ports of this VIP still reach the network"
                    }
                    (false, GroupKind::Cleanup | GroupKind::StrictBackends) => "nothing changed",
                };
                return Err(Box::new(ApplyError {
                    subject: group.subject.clone(),
                    kind: group.kind,
                    op: *op,
                    cause,
                    outcome,
                    undo_failures,
                    completed: std::mem::take(report),
                }));
            }
        }
    }
    Ok(())
}
