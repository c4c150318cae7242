//! `ltmc`: a real-time coordination service for AI agents.
//!
//! Agents register and heartbeat ([`agents`]), send each other durable prioritised messages and
//! claim → ack them under leases ([`messages`]), and watch their notifications live over
//! WebSocket ([`events`]); they pass work on with [`handoffs`] and run [`workflows`]. The SQL
//! [`store`] is the truth; the [`broker`] (in-process or Redis)
//! is the real-time layer. Start reading at [`app`].

pub mod admission; // new work bounded: 429 past the backlog's bound, accepted work first
pub mod agents; // registry: records in SQL, presence in the broker
pub mod app; // AppState, router, run(listener, shutdown)
pub mod auth; // tokens and who may do what
pub mod background; // the reaper / expiry / pruning loop as step functions
pub mod broker; // enum Broker { Memory, Redis }: presence, pub/sub, hot copies
pub mod checkpoints; // coordination state saved and restored (cache fast path, store truth)
pub mod common; // ids, timestamps, pages
pub mod config; // flags + LTMC_* environment
pub mod contexts; // each agent's versioned context, and syncs merging them
pub mod coordinations; // scatter-gather rounds: one question, N agents, a deadline
pub mod error; // one error type -> problem+json
pub mod events; // event log, hub fan-out, WebSocket streams
pub mod handoffs; // work passed between agents with its context, digest-checked
pub mod memory; // memories (full-text), graph edges, patterns: the record of what happened
pub mod messages; // durable per-agent priority queues with leases
pub mod openapi; // the OpenAPI document
pub mod ops; // healthz, readyz, openapi.json
pub mod origin; // Host and WebSocket Origin checks: no web page borrows the service
pub mod retention; // finished records purged after their retention, space given back
pub mod server; // accept loop: connection cap, header timeout, fd limit, back-off
pub mod sessions; // units of work with an activity log, expiring when idle
pub mod store; // SQLite store, ordered writer in two lanes (finishing work first)
pub mod workflows; // multi-agent workflows: four patterns, retries, timeouts, restarts
