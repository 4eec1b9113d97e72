//! Shard selection: one user's events always go to the same queue shard, so they stay
//! in order. The hash is FNV-1a 64, fixed forever: changing it would reorder users
//! across a deploy.

/// FNV-1a 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard for an event: keyed by `anonymousId` when present (a browser's events,
/// before and after identify, share it), else by `userId`.
pub fn shard_for(anonymous_id: Option<&str>, user_id: Option<&str>, shards: u32) -> u32 {
    let shards = shards.max(1);
    let key = anonymous_id.or(user_id).unwrap_or("");
    (fnv1a64(key.as_bytes()) % u64::from(shards)) as u32
}

/// [`shard_for`], skipping ids on the block list (a placeholder such as `"undefined"`
/// would pile every such client onto one shard); an event with no usable id is keyed
/// by its `messageId`, so those spread out too.
pub fn shard_for_event(
    anonymous_id: Option<&str>,
    user_id: Option<&str>,
    message_id: &str,
    block: &crate::identity::BlockList,
    shards: u32,
) -> u32 {
    let anonymous_id = anonymous_id.filter(|v| block.blocked(v).is_none());
    let user_id = user_id.filter(|v| block.blocked(v).is_none());
    match (anonymous_id, user_id) {
        (None, None) => shard_for(Some(message_id), None, shards),
        (a, u) => shard_for(a, u, shards),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn blocked_ids_do_not_choose_the_shard() {
        let block = crate::identity::BlockList::default();
        for n in [4, 16] {
            // A placeholder anonymous id: the user id decides, as if it were absent.
            assert_eq!(
                shard_for_event(Some("undefined"), Some("u1"), "m", &block, n),
                shard_for(None, Some("u1"), n)
            );
            // Nothing usable: the message id spreads such events over the shards.
            let shards: std::collections::HashSet<u32> = (0..64)
                .map(|i| shard_for_event(Some("guest"), Some("0"), &format!("m{i}"), &block, n))
                .collect();
            assert!(shards.len() > 1);
            // Real ids shard as before.
            assert_eq!(
                shard_for_event(Some("a1"), Some("u1"), "m", &block, n),
                shard_for(Some("a1"), Some("u1"), n)
            );
        }
    }

    #[test]
    fn same_user_always_same_shard_and_in_range() {
        for n in 1..10 {
            let a = shard_for(Some("anon-1"), Some("u"), n);
            assert_eq!(a, shard_for(Some("anon-1"), None, n));
            assert!(a < n);
        }
        assert_eq!(
            shard_for(None, Some("u1"), 4),
            shard_for(None, Some("u1"), 4)
        );
        assert_eq!(shard_for(None, None, 0), 0);
    }
}
