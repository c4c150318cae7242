//! `fanout`: one parallel workflow of `--steps` (default 100) steps spread
//! over `--agents` (default 100), each agent on its stream; then the next,
//! one at a time through the window (`runs.rs`). The default gives each step
//! its own agent, as the floor's `flowbench --mode fanout --width 100` gives
//! each branch its own worker and a chord of 100 its own task: the join then
//! waits on 100 frames, claims and results, not on one agent's batches.
//! Rows: `fanout`, a run's time, from just before the submit to the result
//! that completes it (the join: the run's `status` in that result's answer is
//! `completed`); `step`, from the submit's answer to each result accepted;
//! and the agents' `claim` and `result`.

use std::sync::Arc;

use crate::Bench;
use crate::tally::{header, row};

pub async fn run(b: Arc<Bench>) -> Result<(), String> {
    let steps = b.parallel(0, b.steps);
    let ran = b.one_at_a_time("fanout", "parallel", steps).await?;
    let (st, secs) = (&b.st, ran.window.secs());
    header();
    row("connect", &st.connect, ran.open_secs);
    row("fanout", &st.e2e, secs);
    row("step", &st.step, secs);
    row("claim", &st.claim, secs);
    row("result", &st.result, secs);
    let (runs, steps, agents) = (st.e2e.ok(), b.steps, b.targets);
    println!("fanout: {runs} runs of {steps} steps over {agents} agents completed");
    println!(
        "streams: {} of {agents} still open at the end",
        ran.still_open
    );
    Ok(())
}
