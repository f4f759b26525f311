//! One etcd connection that moves itself between endpoints: every call is bounded by a
//! client-side timeout, and a call that fails or times out moves the connection to the
//! next endpoint before the error is returned.
//!
//! Why not the crate's own multi-endpoint channel: with etcd-client 0.21 a client built
//! on three endpoints kept sending every request to a SIGKILLed member ("connection
//! refused") for over 90 s (shared/testbed/etcd, pitfall 1). And why every call is
//! bounded: a proposal made while etcd elects a new leader hangs for the server's request
//! timeout (5 s + 2 × election timeout), far longer than a lease (pitfall 4).
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, GetResponse, KeyValue, LeaseGrantResponse, Txn, TxnResponse,
};

/// Why an etcd call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// The call got no answer within the client-side timeout.
    #[error("etcd at {endpoint} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The endpoint tried.
        endpoint: String,
        /// The bound.
        timeout_ms: u64,
    },
    /// The member answered with an error, or the connection failed.
    #[error("etcd at {endpoint}: {message}")]
    Call {
        /// The endpoint tried.
        endpoint: String,
        /// What it said.
        message: String,
    },
}

/// A connection to one member at a time, with its own fail-over.
pub struct EtcdConn {
    endpoints: Vec<String>,
    at: usize,
    client: Option<Client>,
    timeout: Duration,
}

impl EtcdConn {
    /// A connection over `endpoints` (`http://host:port` or `host:port`), starting at
    /// the one `start` picks (spreads several controllers over the members). Nothing is
    /// dialled until the first call.
    pub fn new(endpoints: Vec<String>, timeout: Duration, start: usize) -> Self {
        let at = if endpoints.is_empty() {
            0
        } else {
            start % endpoints.len()
        };
        EtcdConn {
            endpoints,
            at,
            client: None,
            timeout,
        }
    }

    /// The endpoint calls go to now.
    pub fn endpoint(&self) -> &str {
        self.endpoints.get(self.at).map_or("", String::as_str)
    }

    /// The per-call bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn fail_over(&mut self) {
        self.client = None;
        if !self.endpoints.is_empty() {
            self.at = (self.at + 1) % self.endpoints.len();
        }
    }

    async fn client(&mut self) -> Result<Client, EtcdError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let endpoint = self.endpoint().to_owned();
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            // HTTP/2 pings notice a member that vanished without resetting the
            // connection; etcd must allow them (`--grpc-keepalive-min-time` below this).
            .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500))
            // A member that knows it has no leader answers at once instead of hanging.
            .with_require_leader(true);
        let connected = tokio::time::timeout(
            self.timeout,
            Client::connect([endpoint.as_str()], Some(opts)),
        )
        .await;
        let c = self.outcome(endpoint, connected)?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// A bounded call's result; a failure or a timeout moves to the next member.
    fn outcome<T>(
        &mut self,
        endpoint: String,
        r: Result<Result<T, etcd_client::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, EtcdError> {
        let err = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => EtcdError::Call {
                endpoint,
                message: e.to_string(),
            },
            Err(_) => EtcdError::Timeout {
                endpoint,
                timeout_ms: self.timeout.as_millis() as u64,
            },
        };
        self.fail_over();
        Err(err)
    }

    /// Runs one call on the current member, bounded; on failure moves to the next.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        let endpoint = self.endpoint().to_owned();
        let r = tokio::time::timeout(self.timeout, f(client)).await;
        self.outcome(endpoint, r)
    }

    /// A transaction.
    pub async fn txn(&mut self, txn: Txn) -> Result<TxnResponse, EtcdError> {
        self.call(|mut c| async move { c.txn(txn).await }).await
    }

    /// One key, if present.
    pub async fn get(&mut self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let key = key.to_owned();
        let r: GetResponse = self
            .call(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(r.kvs().first().cloned())
    }

    /// Every key under `prefix`, read in pages of `page` keys (one answer stays far
    /// below gRPC's message limit whatever the store holds), in key order.
    pub async fn get_prefix(&mut self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        const PAGE: i64 = 500;
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let (start, range_end) = (from.clone(), end.clone());
            let r: GetResponse = self
                .call(|mut c| async move {
                    c.get(
                        start,
                        Some(GetOptions::new().with_range(range_end).with_limit(PAGE)),
                    )
                    .await
                })
                .await?;
            let kvs = r.kvs();
            out.extend(kvs.iter().cloned());
            match kvs.last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// A lease of `ttl_s` seconds (etcd may grant a longer one: it never grants less
    /// than ⌈1.5 × its election timeout⌉).
    pub async fn lease_grant(&mut self, ttl_s: i64) -> Result<LeaseGrantResponse, EtcdError> {
        self.call(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .await
    }

    /// One keep-alive of `lease`: its remaining TTL in seconds (≤ 0: the lease is gone).
    pub async fn keep_alive_once(&mut self, lease: i64) -> Result<i64, EtcdError> {
        self.call(|mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Ok(0),
            }
        })
        .await
    }

    /// Revokes a lease (its keys go at once).
    pub async fn lease_revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        self.call(|mut c| async move { c.lease_revoke(lease).await.map(|_| ()) })
            .await
    }
}

/// The end of the range of every key starting with `prefix` (etcd's convention: the
/// prefix with its last byte below 0xff incremented).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_end_is_the_prefix_with_its_last_byte_incremented() {
        assert_eq!(prefix_end(b"/defib/a/"), b"/defib/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
