//! Shutdown signalling: one broadcast out to every task, and a way to wait for SIGTERM/SIGINT.

use tokio::sync::watch;

/// Resolves on SIGTERM (Kubernetes, `kill`) or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}

/// The sending side of a shutdown broadcast; dropping it also counts as shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A cloneable receiver that every task holds and awaits.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown was triggered (or the trigger dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// A shutdown that never fires, for tests and tools that stop by returning.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }
}

/// A shutdown that fires when `future` resolves, e.g. `from_future(shutdown::signal())`.
pub fn from_future(future: impl std::future::Future<Output = ()> + Send + 'static) -> Shutdown {
    let (trigger, shutdown) = channel();
    tokio::spawn(async move {
        future.await;
        trigger.fire();
        // Keep the sender alive so receivers see `true` rather than a closed channel.
        std::future::pending::<()>().await;
    });
    shutdown
}
