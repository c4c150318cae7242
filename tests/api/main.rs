//! The integration suite: one binary, the real server over HTTP and WebSocket, each test against
//! both brokers (the in-process one and a real Redis).

mod harness;

mod agents;
mod auth;
mod bounds;
mod checkpoints;
mod connections;
mod contexts;
mod coordinations;
mod dashboard;
mod faults;
mod handoffs;
mod inputs;
mod memory;
mod messages;
mod metrics;
mod mistakes;
mod openapi;
mod origins;
mod overload;
mod readme;
mod retention;
mod sessions;
mod streams;
mod workflows;
