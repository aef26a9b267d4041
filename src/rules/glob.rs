//! Wildcard values: `*` matches zero or more characters, anywhere in the value.

/// A value pattern with at least one `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    /// The literal pieces between the stars, in order. A pattern `a*b*c` is `["a", "b", "c"]`;
    /// `*x` is `["", "x"]`.
    pieces: Vec<String>,
}

impl Glob {
    /// The pattern of `text`, or `None` when it has no `*` and is a plain value.
    pub fn new(text: &str) -> Option<Glob> {
        text.contains('*').then(|| Glob {
            pieces: text.split('*').map(str::to_owned).collect(),
        })
    }

    /// Whether `value` matches the whole pattern.
    pub fn matches(&self, value: &str) -> bool {
        // At least two pieces, since the pattern holds a star.
        let (first, rest) = self.pieces.split_first().expect("a glob holds a star");
        let (last, middle) = rest.split_last().expect("a glob holds a star");
        let Some(mut tail) = value.strip_prefix(first.as_str()) else {
            return false;
        };
        // The first and last pieces are anchored; each middle piece is taken at its leftmost
        // place, which is the greedy choice that leaves the most room for what follows.
        for piece in middle {
            match tail.find(piece.as_str()) {
                Some(at) => tail = &tail[at + piece.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    fn matches(pattern: &str, value: &str) -> bool {
        Glob::new(pattern).unwrap().matches(value)
    }

    #[test]
    fn plain_values_are_not_globs() {
        assert_eq!(Glob::new("abc"), None);
    }

    #[test]
    fn star_matches_zero_or_more_characters_anywhere() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("/api/*", "/api/"));
        assert!(matches("/api/*", "/api/users"));
        assert!(!matches("/api/*", "/apx/users"));
        assert!(matches("*.pdf", "a.pdf"));
        assert!(!matches("*.pdf", "a.pdfx"));
        assert!(matches("/v*/users/*/posts", "/v1/users/42/posts"));
        assert!(!matches("/v*/users/*/posts", "/v1/users/42/post"));
        assert!(matches("a*a", "aa"));
        assert!(!matches("a*a", "a"));
        assert!(matches("a*b*b", "abbb"));
        assert!(matches("**", "x"));
    }
}
