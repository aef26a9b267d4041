//! Bucket keys: the one place where the name of a bucket is made.
//!
//! A bucket belongs to one (domain, descriptor entries, limit). Its key is the concatenation of
//! *parts*, each written as its length in decimal, a `:`, then its bytes:
//!
//! ```text
//! sl: part(domain) part(entry count) { part(key) part(tag · value) }* part(limit id)
//! ```
//!
//! # Why two buckets never share a key
//!
//! A reader of a key knows where each part ends before it reads the part (the length comes
//! first and holds only digits, ended by `:`), so a key splits into its parts in exactly one way,
//! and the entry count says how many entry parts follow. Different inputs therefore give
//! different keys, whatever bytes the values hold: the entry `("a", "b_c")` and the entry
//! `("a_b", "c")` give `1:a4:vb_c` and `3:a_b2:vc`. Each value carries a tag byte: `v` for the
//! request's own value, `s` for the wildcard pattern of a `share_threshold` rule, so a request
//! whose literal value is `files/*` never lands in the shared bucket of the pattern `files/*`.
//!
//! The limit id names the rule's place in the tree and the limit's index there (see
//! [`crate::rules::Limit::id`]), not its numbers, so a changed limit keeps its bucket; a client
//! override has its own id, so it never shares a bucket with a configured limit.

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of the key, or of its hash tag (the
/// bytes between the first `{` and the next `}`, when not empty), modulo 16384.
///
/// Bucket keys carry no hash tag of their own, so the buckets of one decision spread over the
/// cluster by their whole keys, and a Cluster store groups them by this slot.
pub fn cluster_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % 16_384
}

/// FNV-1a, continued from `hash` (start from [`FNV_START`]): a stable 64-bit hash, the same in
/// every process, for names that must not change between runs.
pub(crate) fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The starting value of [`fnv1a`].
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The prefix of every bucket key.
pub const PREFIX: &[u8] = b"sl:";

/// The limit id of a limit a client sent with its descriptor.
pub const OVERRIDE_LIMIT_ID: &[u8] = b"8:override";

/// Appends one length-prefixed part.
pub fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(part.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(part);
}

/// One entry of a descriptor as it is named in a key.
#[derive(Clone, Copy, Debug)]
pub struct KeyEntry<'a> {
    /// The descriptor key.
    pub key: &'a str,
    /// The request's value, or the shared wildcard pattern.
    pub value: &'a str,
    /// Whether `value` is a shared wildcard pattern rather than the request's value.
    pub shared: bool,
}

/// Whether bucket keys carry a Redis Cluster hash tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HashTag {
    /// No tag: buckets spread over the cluster by their whole keys.
    #[default]
    None,
    /// A tag made from the domain and the descriptor's first entry, so that every bucket of
    /// one identity (say `user = alice`, alone or with deeper entries) is in one slot, and a
    /// decision about it is one script call on one node.
    FirstEntry,
}

/// The key of the bucket of `limit_id` for the descriptor `entries` in `domain`.
///
/// With [`HashTag::FirstEntry`], `{` sixteen hex digits `}` follow the prefix: an FNV-1a hash
/// of the domain and first entry, which the rest of the key holds anyway, so keys stay
/// distinct; hex digits hold no brace, so the tag always ends where it should.
pub fn bucket_key(
    domain: &str,
    entries: &[KeyEntry<'_>],
    limit_id: &[u8],
    hash_tag: HashTag,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(PREFIX);
    if let (HashTag::FirstEntry, Some(first)) = (hash_tag, entries.first()) {
        let mut identity = Vec::new();
        push_part(&mut identity, domain.as_bytes());
        push_part(&mut identity, first.key.as_bytes());
        push_part(&mut identity, first.value.as_bytes());
        out.extend_from_slice(format!("{{{:016x}}}", fnv1a(FNV_START, &identity)).as_bytes());
    }
    push_part(&mut out, domain.as_bytes());
    push_part(&mut out, entries.len().to_string().as_bytes());
    let mut tagged = Vec::new();
    for entry in entries {
        push_part(&mut out, entry.key.as_bytes());
        tagged.clear();
        tagged.push(if entry.shared { b's' } else { b'v' });
        tagged.extend_from_slice(entry.value.as_bytes());
        push_part(&mut out, &tagged);
    }
    push_part(&mut out, limit_id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(domain: &str, entries: &[(&str, &str, bool)], limit: &[u8]) -> Vec<u8> {
        tagged_key(domain, entries, limit, HashTag::None)
    }

    fn tagged_key(
        domain: &str,
        entries: &[(&str, &str, bool)],
        limit: &[u8],
        tag: HashTag,
    ) -> Vec<u8> {
        let entries: Vec<KeyEntry<'_>> = entries
            .iter()
            .map(|&(key, value, shared)| KeyEntry { key, value, shared })
            .collect();
        bucket_key(domain, &entries, limit, tag)
    }

    #[test]
    fn a_first_entry_tag_puts_one_identity_in_one_slot() {
        let tag = HashTag::FirstEntry;
        let alone = tagged_key("d", &[("user", "alice", false)], b"1", tag);
        let deeper = tagged_key(
            "d",
            &[("user", "alice", false), ("path", "/x", false)],
            b"2",
            tag,
        );
        let other = tagged_key("d", &[("user", "bob", false)], b"1", tag);
        assert_eq!(cluster_slot(&alone), cluster_slot(&deeper));
        assert_ne!(alone, other);
        assert!(alone.starts_with(b"sl:{") && alone[20] == b'}');
    }

    #[test]
    fn separators_inside_values_do_not_collide() {
        assert_ne!(
            key("d", &[("a", "b_c", false)], b"x"),
            key("d", &[("a_b", "c", false)], b"x")
        );
        assert_ne!(
            key("d_a", &[("b", "c", false)], b"x"),
            key("d", &[("a_b", "c", false)], b"x")
        );
        assert_ne!(
            key("d", &[("a", "b", false), ("c", "d", false)], b"x"),
            key("d", &[("a", "b1:c2:vd", false)], b"x")
        );
    }

    #[test]
    fn a_shared_pattern_is_not_a_literal_value() {
        assert_ne!(
            key("d", &[("f", "a*", true)], b"x"),
            key("d", &[("f", "a*", false)], b"x")
        );
    }

    #[test]
    fn limits_of_one_descriptor_have_their_own_buckets() {
        assert_ne!(
            key("d", &[("a", "b", false)], b"1"),
            key("d", &[("a", "b", false)], b"2")
        );
        assert_ne!(
            key("d", &[("a", "b", false)], b"1"),
            key("d", &[("a", "b", false)], OVERRIDE_LIMIT_ID)
        );
    }

    #[test]
    fn slots_follow_redis_cluster() {
        // Values given in the Redis Cluster specification and by CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(cluster_slot(b"foo"), 12_182);
        assert_eq!(
            cluster_slot(b"{user1000}.following"),
            cluster_slot(b"user1000")
        );
        assert_eq!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"foo{}{bar}"));
        assert_ne!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"bar"));
    }

    #[test]
    fn the_layout_is_readable() {
        assert_eq!(
            key("web", &[("ip", "1.2.3.4", false)], b"0"),
            b"sl:3:web1:12:ip8:v1.2.3.41:0"
        );
    }
}
