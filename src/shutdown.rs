//! Ctrl-C and SIGTERM as a normal event: stages check the flag at safe points and stop there.

use tokio::sync::watch;

/// A shared shutdown signal; clones observe the same trigger.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Shutdown {
    /// A signal that only fires when [`Shutdown::trigger`] is called.
    pub fn manual() -> Self {
        let (tx, rx) = watch::channel(false);
        Self { rx, tx: std::sync::Arc::new(tx) }
    }

    /// A signal that fires on SIGINT or SIGTERM.
    pub fn on_signals() -> Self {
        let s = Self::manual();
        let trigger = s.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown requested; stopping at the next safe point");
            trigger.trigger();
        });
        s
    }

    /// Fires the signal.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when the signal fires.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Aborts a background task when dropped, whichever way the function holding it returns.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
