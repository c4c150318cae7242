//! Admission control for new work: message sends, workflow submits and handoff initiations.
//!
//! New work waits behind the work that finishes what was already accepted (see
//! [`crate::store::lanes`] and [`crate::store::intake`]), so when the store cannot keep up it
//! is new work that queues. This bounds that queue: the *backlog* is the new work admitted and
//! not yet answered, in units — a message, a handoff or a workflow step each count one (a
//! submit of ten steps is ten). A request that would take the backlog past its bound
//! (`--max-new-backlog`) is refused at once with 429 `overloaded` and `Retry-After`, before
//! anything is written; one larger than the whole bound is admitted when the backlog is empty,
//! so no valid request is refused for good. Nothing admitted is ever dropped: the bound only
//! decides what is let in.
//!
//! A refusal under overload should cost little: each new-work handler takes a [`Room`] before
//! its body, which refuses at once while the backlog is already at its bound, before the body is
//! read or validated (so such a refusal says nothing of the request itself: it may be invalid
//! too); [`Admission::admit`], with the request's own units, follows validation.
//!
//! Each instance bounds its own backlog: it is the queue in front of its own writer.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use prometheus::IntCounterVec;

use crate::app::AppState;
use crate::error::{Error, Result};

/// The kinds of new work, as the refusal counter labels them.
#[derive(Debug, Clone, Copy)]
pub enum NewWork {
    Message,
    Workflow,
    Handoff,
}

impl NewWork {
    fn label(self) -> &'static str {
        match self {
            NewWork::Message => "message",
            NewWork::Workflow => "workflow",
            NewWork::Handoff => "handoff",
        }
    }
}

/// The backlog of new work and its bound; shared by the instance's handlers.
pub struct Admission {
    backlog: AtomicU64,
    limit: u64,
    refused: IntCounterVec,
}

impl Admission {
    /// `refused` counts refusals by kind (`ltmc_new_work_refused_total`).
    pub fn new(limit: u32, refused: IntCounterVec) -> Arc<Admission> {
        Arc::new(Admission {
            backlog: AtomicU64::new(0),
            limit: u64::from(limit),
            refused,
        })
    }

    fn refuse(&self, kind: NewWork, backlog: u64) -> Error {
        self.refused.with_label_values(&[kind.label()]).inc();
        Error::Overloaded(format!(
            "over capacity: {backlog} units of new work already wait for the store (the bound \
             is {}); work already accepted goes first: retry later",
            self.limit
        ))
    }

    /// Refuses `kind` while the backlog is at its bound (nothing could be admitted).
    pub fn room(&self, kind: NewWork) -> Result<()> {
        match self.backlog() {
            backlog if backlog >= self.limit => Err(self.refuse(kind, backlog)),
            _ => Ok(()),
        }
    }

    /// Admits `units` of new work, or refuses them (429) when the backlog would pass its bound.
    /// The backlog holds them until the ticket is dropped, once the request is answered.
    pub fn admit(self: &Arc<Self>, kind: NewWork, units: u64) -> Result<Ticket> {
        let admitted = self
            .backlog
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |backlog| {
                (backlog == 0 || backlog + units <= self.limit).then_some(backlog + units)
            });
        match admitted {
            Ok(_) => Ok(Ticket {
                admission: self.clone(),
                units,
            }),
            Err(backlog) => Err(self.refuse(kind, backlog)),
        }
    }

    /// New work admitted and not yet answered, in units.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Acquire)
    }

    /// The bound on [`Admission::backlog`].
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// The kind of new work a handler takes, for [`Room`].
pub trait Kind {
    const WORK: NewWork;
}

/// [`Kind`]s of new work.
pub struct Messages;
pub struct Workflows;
pub struct Handoffs;

impl Kind for Messages {
    const WORK: NewWork = NewWork::Message;
}
impl Kind for Workflows {
    const WORK: NewWork = NewWork::Workflow;
}
impl Kind for Handoffs {
    const WORK: NewWork = NewWork::Handoff;
}

/// An extractor: there is room for new work of kind `K`, else 429 before the body is read.
pub struct Room<K>(PhantomData<K>);

impl<K: Kind> FromRequestParts<AppState> for Room<K> {
    type Rejection = Error;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self> {
        state.admission.room(K::WORK)?;
        Ok(Room(PhantomData))
    }
}

/// Admitted work's place in the backlog, given back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    units: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .backlog
            .fetch_sub(self.units, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn admission(limit: u32) -> Arc<Admission> {
        let refused = IntCounterVec::new(Opts::new("refused", "refused"), &["kind"]).unwrap();
        Admission::new(limit, refused)
    }

    #[test]
    fn the_bound_refuses_what_would_pass_it_and_frees_what_is_answered() {
        let admission = admission(10);
        let seven = admission.admit(NewWork::Workflow, 7).unwrap();
        let three = admission.admit(NewWork::Message, 3).unwrap();
        assert!(matches!(
            admission.admit(NewWork::Handoff, 1),
            Err(Error::Overloaded(_))
        ));
        assert_eq!(admission.backlog(), 10);
        drop(seven);
        assert_eq!(admission.backlog(), 3);
        let _more = admission.admit(NewWork::Message, 7).unwrap();
        drop(three);
        assert_eq!(admission.backlog(), 7);
        let refused = admission.refused.with_label_values(&["handoff"]).get();
        assert_eq!(refused, 1);
    }

    #[test]
    fn work_larger_than_the_bound_goes_alone() {
        let admission = admission(10);
        let big = admission.admit(NewWork::Workflow, 500).unwrap();
        assert!(admission.admit(NewWork::Message, 1).is_err());
        drop(big);
        assert!(admission.admit(NewWork::Workflow, 500).is_ok());
    }
}
