//! `chain`: one sequential workflow of `--steps` (default 50) steps
//! alternating between two agents, each on its stream, run end to end; then
//! the next, one at a time through the window (`runs.rs`). Rows: `chain`, a
//! run's time, from just before the submit to its last step's result
//! accepted; `handover`, from just before a step's result POST to the next
//! step's `new_message` frame on the other agent's stream; and the agents'
//! `claim` and `result`. The line below gives the median per step, as the
//! floor's `flowbench --mode chain` gives its per hand-over.

use std::sync::Arc;

use crate::Bench;
use crate::tally::{header, row};

pub async fn run(b: Arc<Bench>) -> Result<(), String> {
    let steps = b.sequential([0, 1], b.steps);
    let ran = b.one_at_a_time("chain", "sequential", steps).await?;
    let (st, secs) = (&b.st, ran.window.secs());
    header();
    row("connect", &st.connect, ran.open_secs);
    row("chain", &st.e2e, secs);
    row("handover", &st.handover, secs);
    row("claim", &st.claim, secs);
    row("result", &st.result, secs);
    let (runs, steps) = (st.e2e.ok(), b.steps);
    print!("chain: {runs} runs of {steps} steps completed");
    match st.e2e.median() {
        Some(p50) => {
            let per_step = p50.as_secs_f64() * 1000.0 / steps as f64;
            println!(", {per_step:.2} ms per step at the median");
        }
        None => println!(),
    }
    println!("streams: {} of 2 still open at the end", ran.still_open);
    Ok(())
}
