//! Which queued inputs make the next batch.

use std::collections::VecDeque;

use super::job::Item;
use super::BatchPolicy;

/// Oldest first, up to `max_size` inputs and `max_tokens` padded tokens (at least one input).
pub(super) fn take_in_order(queue: &mut VecDeque<Item>, policy: &BatchPolicy) -> Vec<Item> {
    let mut longest = 0;
    let mut count = 0;
    for item in queue.iter() {
        let longer = longest.max(item.tokens);
        if count > 0 && (count + 1 > policy.max_size || (count + 1) * longer > policy.max_tokens) {
            break;
        }
        longest = longer;
        count += 1;
    }
    queue.drain(..count).collect()
}

/// The oldest input plus the inputs nearest to it in length among the `grouping_window`
/// oldest: of the runs of inputs adjacent in length order that contain the oldest and fit
/// the bounds, the one with the most inputs, then the least padding.
pub(super) fn take_grouped(queue: &mut VecDeque<Item>, policy: &BatchPolicy) -> Vec<Item> {
    let window = queue.len().min(policy.grouping_window.max(1));
    // Positions in the queue, shortest first; equal lengths stay oldest first.
    let mut order: Vec<usize> = (0..window).collect();
    order.sort_by_key(|&i| queue[i].tokens);
    let tokens = |k: usize| queue[order[k]].tokens;
    let mut prefix = vec![0usize; window + 1];
    for k in 0..window {
        prefix[k + 1] = prefix[k] + tokens(k);
    }
    let oldest = order
        .iter()
        .position(|&i| i == 0)
        .expect("the oldest is in the window");
    let fits = |start: usize, end: usize| {
        end - start <= policy.max_size && (end - start) * tokens(end - 1) <= policy.max_tokens
    };
    // Best run [start, end) so far, as (inputs, padding).
    let mut best = (oldest, oldest + 1);
    let mut best_score = (1, 0);
    for start in oldest.saturating_sub(policy.max_size - 1)..=oldest {
        if !fits(start, oldest + 1) {
            continue;
        }
        let mut end = oldest + 1;
        while end < window && fits(start, end + 1) {
            end += 1;
        }
        let inputs = end - start;
        let padding = inputs * tokens(end - 1) - (prefix[end] - prefix[start]);
        if inputs > best_score.0 || (inputs == best_score.0 && padding < best_score.1) {
            best = (start, end);
            best_score = (inputs, padding);
        }
    }
    let mut chosen = vec![false; window];
    for &position in &order[best.0..best.1] {
        chosen[position] = true;
    }
    let head: Vec<Item> = queue.drain(..window).collect();
    let mut batch = Vec::with_capacity(best.1 - best.0);
    let mut rest = Vec::with_capacity(window - batch.capacity());
    for (item, chosen) in head.into_iter().zip(chosen) {
        if chosen {
            batch.push(item);
        } else {
            rest.push(item);
        }
    }
    for item in rest.into_iter().rev() {
        queue.push_front(item);
    }
    batch
}
