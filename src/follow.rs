//! The change-feed follower: applies changes made elsewhere (the CLI,
//! another node) to this server's live state.
//!
//! Every store write that matters appends to the `events` table; each
//! server reads the entries after the last one it applied, every
//! `store.follow_interval`. The table stays the source of truth, so a
//! store that can push notifications (PostgreSQL `LISTEN`/`NOTIFY`) only
//! needs to wake [`follow`] early instead of the timer — a lost
//! notification then costs one interval, never a change.
//!
//! What a change does here:
//! - a password change, disable, removal or move ends the user's live
//!   sessions (their next login reads the store afresh);
//! - a drain with a spread ends the backend's sessions one by one over
//!   that many seconds, so that clients do not all reconnect at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tracing::{error, info};

use crate::server::Shared;
use crate::sessions::Selector;
use crate::store::{Change, Event};

/// Starts following the feed from its current end.
pub async fn start(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let last = shared.store.last_event().await?;
    tokio::spawn(follow(shared.clone(), last));
    Ok(())
}

/// Events older than this are deleted (by whichever server gets there).
const KEEP_EVENTS: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a server prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

async fn follow(shared: Arc<Shared>, mut last: i64) {
    let mut tick = tokio::time::interval(shared.config.store.follow_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pruned = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            match shared.store.prune_events(KEEP_EVENTS).await {
                Ok(n) if n > 0 => info!(events = n, "pruned the change feed"),
                Ok(_) => {}
                Err(e) => error!(error = %e, "cannot prune the change feed"),
            }
        }
        match shared.store.events_since(last).await {
            Ok(events) => {
                for event in events {
                    last = event.id;
                    apply(&shared, event);
                }
            }
            Err(e) => error!(error = %e, "cannot read the change feed"),
        }
    }
}

fn apply(shared: &Arc<Shared>, event: Event) {
    let Some(change) = event.change else { return };
    if change.ends_sessions() {
        let n = shared.sessions.kick(&Selector::User(event.subject.clone()));
        if n > 0 {
            info!(
                user = event.subject.as_str(),
                change = change.as_str(),
                sessions = n,
                "ended sessions after a change"
            );
        }
    } else if change == Change::Drain {
        let spread = event
            .detail
            .as_deref()
            .and_then(|d| d.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(0.0);
        tokio::spawn(drain(
            shared.clone(),
            event.subject,
            Duration::from_secs_f64(spread.min(86_400.0)),
        ));
    }
}

/// Ends every session on `backend`, spread evenly over `spread`.
async fn drain(shared: Arc<Shared>, backend: String, spread: Duration) {
    let ids = shared
        .sessions
        .matching(&Selector::Backend(backend.clone()));
    info!(%backend, sessions = ids.len(), spread_s = spread.as_secs_f64(), "draining");
    if ids.is_empty() {
        return;
    }
    let step = spread / ids.len() as u32;
    for id in ids {
        shared.sessions.kick_id(id);
        if !step.is_zero() {
            tokio::time::sleep(step).await;
        }
    }
}
