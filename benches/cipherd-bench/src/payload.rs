//! Payloads made once, before measuring, and the small helpers that pick them.
//!
//! Payload bytes are leaked into `'static` [`Bytes`]: the pool lives as long as the
//! process anyway, and a static `Bytes` clones without touching a reference count,
//! so building a 400-item request costs 400 pointer copies and no atomic traffic
//! between the generator's threads.

use std::future::Future;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::task::JoinSet;

/// Distinct payloads per key and where each request takes its items from.
#[derive(Debug, Clone)]
pub struct Pool {
    /// One list per key, or a single list shared by all keys (plaintexts).
    lists: Vec<Vec<Bytes>>,
}

impl Pool {
    /// A pool whose every list is non-empty.
    ///
    /// # Errors
    /// If there are no lists or one is empty.
    pub fn new(lists: Vec<Vec<Bytes>>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !lists.is_empty() && lists.iter().all(|l| !l.is_empty()),
            "empty payload pool"
        );
        Ok(Self { lists })
    }

    /// Item `j` of request `seq` for key `k`: consecutive requests walk through
    /// the key's list so that batches differ.
    pub fn item(&self, k: usize, seq: u64, batch: usize, j: usize) -> &Bytes {
        let list = &self.lists[k % self.lists.len()];
        let at = seq.wrapping_mul(batch as u64).wrapping_add(j as u64) % list.len() as u64;
        // `at < list.len()`, which is a usize.
        &list[at as usize]
    }
}

/// `count` plaintexts of `size` bytes each, deterministic pseudo-random content.
pub fn plaintexts(count: usize, size: usize) -> Vec<Bytes> {
    let mut state = 0x5eed_u64;
    (0..count)
        .map(|_| {
            let mut v = Vec::with_capacity(size);
            while v.len() < size {
                let word = splitmix64(&mut state).to_le_bytes();
                let n = (size - v.len()).min(word.len());
                v.extend_from_slice(&word[..n]);
            }
            leak(v)
        })
        .collect()
}

/// Moves `v` into a `'static` `Bytes` (see the module docs for why it is leaked).
pub fn leak(v: Vec<u8>) -> Bytes {
    Bytes::from_static(Box::leak(v.into_boxed_slice()))
}

/// Which of `keys` keys request `seq` goes to: uniform over the keys, stateless.
pub fn key_index(seq: u64, keys: usize) -> usize {
    if keys <= 1 {
        return 0;
    }
    let mut s = seq;
    // The remainder is below `keys`, which is a usize.
    (splitmix64(&mut s) % keys as u64) as usize
}

/// How many distinct ciphertexts each key gets: the pool shared out over the keys,
/// at least one each.
pub fn per_key(pool: usize, keys: usize) -> usize {
    (pool / keys.max(1)).max(1)
}

/// Runs `f(0) … f(n-1)` with at most `limit` at a time; results in index order.
pub async fn map_concurrent<T, F, Fut>(n: usize, limit: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    loop {
        while next < n && set.len() < limit.max(1) {
            let fut = f(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, result) = joined.context("setup task panicked")?;
        out[i] = Some(result?);
    }
    out.into_iter()
        .map(|v| v.context("setup task lost its result"))
        .collect()
}

/// SplitMix64: a tiny, good-enough generator for payload bytes and key choice.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintexts_have_the_size_and_differ() {
        let p = plaintexts(3, 37);
        assert!(p.iter().all(|b| b.len() == 37));
        assert_ne!(p[0], p[1]);
        assert_eq!(plaintexts(1, 0)[0].len(), 0);
    }

    #[test]
    fn items_cycle_through_the_key_list() {
        let pool = Pool::new(vec![plaintexts(3, 4), plaintexts(1, 4)]).unwrap();
        assert_eq!(pool.item(0, 0, 2, 0), pool.item(0, 0, 2, 0));
        assert_ne!(pool.item(0, 0, 2, 0), pool.item(0, 0, 2, 1));
        assert_eq!(pool.item(0, 0, 2, 0), pool.item(0, 3, 2, 0), "period 3");
        assert_eq!(pool.item(1, 5, 2, 1), pool.item(1, 0, 2, 0));
        assert!(Pool::new(vec![vec![]]).is_err());
    }

    #[test]
    fn keys_are_spread_and_in_range() {
        let mut hits = [0u32; 10];
        for seq in 0..10_000 {
            hits[key_index(seq, 10)] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
        assert_eq!(key_index(7, 1), 0);
        assert_eq!(per_key(256, 100_000), 1);
        assert_eq!(per_key(256, 2), 128);
    }

    #[tokio::test]
    async fn map_concurrent_keeps_order_and_reports_errors() {
        let v = map_concurrent(50, 7, |i| async move { Ok(i * 2) })
            .await
            .unwrap();
        assert_eq!(v, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        let err = map_concurrent(5, 2, |i| async move {
            anyhow::ensure!(i != 3, "boom");
            Ok(i)
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("boom"));
    }
}
