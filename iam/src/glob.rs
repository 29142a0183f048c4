//! Wildcard patterns (`*`, `?`) with policy variables, compiled once and matched without
//! backtracking blow-up.
//!
//! A pattern is split at its `*`s into segments when it is compiled. Every segment has a fixed
//! length in characters (literal text, `?` for exactly one character, and variables whose value
//! is known at match time), so the first segment must match at the start, the last at the end,
//! and each middle segment can be matched at its leftmost position: taking the earliest match
//! never leaves less room for the segments after it. That makes matching `O(text × pattern)` in
//! the worst case, with no exponential backtracking whatever the pattern.

use std::fmt;

/// Looks up the value of a policy variable (`${key}`, key already lowercased) at match time.
pub trait Resolve {
    /// The variable's single value, `None` when it cannot be resolved (absent or multi-valued).
    fn var(&self, key: &str) -> Option<&str>;
}

/// A resolver that knows no variables, for patterns that have none.
pub struct NoVars;

impl Resolve for NoVars {
    fn var(&self, _key: &str) -> Option<&str> {
        None
    }
}

/// One piece of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Atom {
    /// Literal text, with its length in characters.
    Lit(Box<str>, usize),
    /// `?`: exactly one character.
    One,
    /// `${key}` (key lowercased): the variable's value, matched literally.
    Var(Box<str>),
}

/// Why a pattern's variables could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VariableError {
    /// `${` without its `}`.
    #[error("`${{` at byte {0} is not closed with `}}`")]
    Unterminated(usize),
    /// `${}` or a name with characters a condition key cannot have.
    #[error("`${{{0}}}` is not a valid variable: write `${{<condition key>}}`, or `${{*}}`, `${{?}}`, `${{$}}`")]
    BadName(String),
}

/// A compiled wildcard pattern. Text substituted for a variable is always literal, so a user
/// name containing `*` never acts as a wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The segments between `*`s; a pattern without `*` has exactly one.
    segs: Vec<Vec<Atom>>,
    has_vars: bool,
    source: Box<str>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Pattern {
    /// Compiles a pattern where `*` and `?` are wildcards and `$` is literal (no variables).
    pub fn new(source: &str) -> Pattern {
        Self::build(source, true, false).expect("patterns without variables always compile")
    }

    /// Compiles a pattern where `*` and `?` are wildcards and `${key}` is a policy variable.
    pub fn with_vars(source: &str) -> Result<Pattern, VariableError> {
        Self::build(source, true, true)
    }

    /// Compiles literal text with policy variables: `*` and `?` match only themselves.
    pub fn literal_with_vars(source: &str) -> Result<Pattern, VariableError> {
        Self::build(source, false, true)
    }

    fn build(source: &str, wildcards: bool, vars: bool) -> Result<Pattern, VariableError> {
        let mut segs: Vec<Vec<Atom>> = vec![Vec::new()];
        let mut lit = String::new();
        let mut has_vars = false;
        let flush = |lit: &mut String, seg: &mut Vec<Atom>| {
            if !lit.is_empty() {
                let n = lit.chars().count();
                seg.push(Atom::Lit(std::mem::take(lit).into_boxed_str(), n));
            }
        };
        let mut rest = source;
        let mut offset = 0;
        while let Some(c) = rest.chars().next() {
            let width = c.len_utf8();
            if vars && rest.starts_with("${") {
                let close = rest.find('}').ok_or(VariableError::Unterminated(offset))?;
                let name = &rest[2..close];
                match name {
                    "*" | "?" | "$" => lit.push_str(name),
                    _ if valid_key(name) => {
                        let seg = segs.last_mut().expect("one segment at least");
                        flush(&mut lit, seg);
                        seg.push(Atom::Var(name.to_ascii_lowercase().into_boxed_str()));
                        has_vars = true;
                    }
                    _ => return Err(VariableError::BadName(name.to_owned())),
                }
                offset += close + 1;
                rest = &rest[close + 1..];
                continue;
            }
            match c {
                '*' if wildcards => {
                    flush(&mut lit, segs.last_mut().expect("one segment at least"));
                    segs.push(Vec::new());
                }
                '?' if wildcards => {
                    let seg = segs.last_mut().expect("one segment at least");
                    flush(&mut lit, seg);
                    seg.push(Atom::One);
                }
                _ => lit.push(c),
            }
            offset += width;
            rest = &rest[width..];
        }
        flush(&mut lit, segs.last_mut().expect("one segment at least"));
        Ok(Pattern { segs, has_vars, source: source.into() })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern has a `*` or `?` wildcard (escapes like `${*}` are not wildcards).
    pub fn has_wildcards(&self) -> bool {
        self.segs.len() > 1 || self.segs[0].contains(&Atom::One)
    }

    /// Whether the pattern uses policy variables.
    pub fn has_vars(&self) -> bool {
        self.has_vars
    }

    /// Whether the pattern is exactly `*`, matching everything.
    pub fn is_match_all(&self) -> bool {
        self.segs.len() == 2 && self.segs.iter().all(Vec::is_empty)
    }

    /// The literal text before the first wildcard or variable, and whether that is the whole
    /// pattern (no wildcard or variable at all).
    pub fn literal_prefix(&self) -> (String, bool) {
        let mut out = String::new();
        for atom in &self.segs[0] {
            match atom {
                Atom::Lit(s, _) => out.push_str(s),
                _ => return (out, false),
            }
        }
        (out, self.segs.len() == 1)
    }

    /// The literal text of a pattern that is exactly `<literal>*` (no other wildcard or
    /// variable), as coverage checks need.
    pub fn literal_then_star(&self) -> Option<String> {
        match self.segs.as_slice() {
            [first, last] if last.is_empty() && first.iter().all(|a| matches!(a, Atom::Lit(..))) => {
                Some(self.literal_prefix().0)
            }
            _ => None,
        }
    }

    /// Case-sensitive match without variables (a pattern with variables matches nothing).
    pub fn matches(&self, text: &str) -> bool {
        self.matches_with(text, false, &NoVars) == Some(true)
    }

    /// ASCII-case-insensitive match without variables, as for action names.
    pub fn matches_ignore_ascii_case(&self, text: &str) -> bool {
        self.matches_with(text, true, &NoVars) == Some(true)
    }

    /// Matches `text` with variables resolved by `vars`; `None` when a variable cannot be
    /// resolved, so that the caller decides what an unresolvable pattern means.
    pub fn matches_with<R: Resolve + ?Sized>(&self, text: &str, ignore_case: bool, vars: &R) -> Option<bool> {
        if self.has_vars && !self.all_vars_resolve(vars) {
            return None;
        }
        Some(self.match_resolved(text, ignore_case, vars))
    }

    /// The text the pattern stands for with its variables substituted, for literal patterns
    /// (`None` when a variable cannot be resolved). Wildcards are written back as `*` and `?`.
    pub fn render<R: Resolve + ?Sized>(&self, vars: &R) -> Option<String> {
        let mut out = String::new();
        for (i, seg) in self.segs.iter().enumerate() {
            if i > 0 {
                out.push('*');
            }
            for atom in seg {
                match atom {
                    Atom::Lit(s, _) => out.push_str(s),
                    Atom::One => out.push('?'),
                    Atom::Var(k) => out.push_str(vars.var(k)?),
                }
            }
        }
        Some(out)
    }

    fn all_vars_resolve<R: Resolve + ?Sized>(&self, vars: &R) -> bool {
        self.segs.iter().flatten().all(|a| match a {
            Atom::Var(k) => vars.var(k).is_some(),
            _ => true,
        })
    }

    fn match_resolved<R: Resolve + ?Sized>(&self, text: &str, ci: bool, vars: &R) -> bool {
        let n = self.segs.len();
        if n == 1 {
            return seg_at(&self.segs[0], text, 0, ci, vars) == Some(text.len());
        }
        let Some(mut pos) = seg_at(&self.segs[0], text, 0, ci, vars) else { return false };
        let last = &self.segs[n - 1];
        let Some(tail) = start_of_last_chars(text, seg_chars(last, vars)) else { return false };
        if tail < pos {
            return false;
        }
        for mid in &self.segs[1..n - 1] {
            if mid.is_empty() {
                continue;
            }
            // `tail` itself is a candidate: a variable may resolve to nothing.
            let found = (pos..=tail)
                .filter(|&start| text.is_char_boundary(start))
                .find_map(|start| seg_at(mid, text, start, ci, vars).filter(|&end| end <= tail));
            match found {
                Some(end) => pos = end,
                None => return false,
            }
        }
        seg_at(last, text, tail, ci, vars) == Some(text.len())
    }
}

/// Whether `name` can be a condition key inside `${...}`.
fn valid_key(name: &str) -> bool {
    name.contains(':')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '_' | '-' | '.' | '@' | '+' | '='))
}

/// Matches one segment at byte `pos`, returning the byte where it ends.
fn seg_at<R: Resolve + ?Sized>(seg: &[Atom], text: &str, mut pos: usize, ci: bool, vars: &R) -> Option<usize> {
    for atom in seg {
        match atom {
            Atom::Lit(s, _) => pos = lit_at(s, text, pos, ci)?,
            Atom::Var(k) => pos = lit_at(vars.var(k).unwrap_or_default(), text, pos, ci)?,
            Atom::One => pos += text[pos..].chars().next()?.len_utf8(),
        }
    }
    Some(pos)
}

fn lit_at(lit: &str, text: &str, pos: usize, ci: bool) -> Option<usize> {
    let end = pos + lit.len();
    let candidate = text.as_bytes().get(pos..end)?;
    let equal = if ci { candidate.eq_ignore_ascii_case(lit.as_bytes()) } else { candidate == lit.as_bytes() };
    // Byte equality with valid UTF-8 starting at a character boundary ends at one too.
    equal.then_some(end)
}

/// A segment's length in characters.
fn seg_chars<R: Resolve + ?Sized>(seg: &[Atom], vars: &R) -> usize {
    seg.iter()
        .map(|a| match a {
            Atom::Lit(_, n) => *n,
            Atom::One => 1,
            Atom::Var(k) => vars.var(k).map_or(0, |v| v.chars().count()),
        })
        .sum()
}

/// The byte where the last `n` characters of `text` start, `None` when it is shorter.
fn start_of_last_chars(text: &str, n: usize) -> Option<usize> {
    if n == 0 {
        return Some(text.len());
    }
    text.char_indices().rev().nth(n - 1).map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Vars(&'static [(&'static str, &'static str)]);
    impl Resolve for Vars {
        fn var(&self, key: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        }
    }

    #[test]
    fn wildcards_are_anchored_and_match_any_run() {
        let rows: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything/at:all", true),
            ("", "", true),
            ("", "a", false),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("abc", "xabc", false),
            ("a*", "a", true),
            ("a*", "a/b/c", true),
            ("*c", "abc", true),
            ("*c", "abcd", false),
            ("a*c", "ac", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbcd", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "abbc", false),
            ("a?c", "aéc", true),
            ("??", "é€", true),
            ("*?", "", false),
            ("*?", "x", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("a**b", "ab", true),
            ("*ab*ab*", "abab", true),
            ("*ab*ab*", "aba", false),
            ("*aa", "aaa", true),
            ("a*a", "a", false),
            ("function/*/version/?", "function/f/version/1", true),
            ("function/*/version/?", "function/f/version/12", false),
            ("Function/x", "function/x", false),
        ];
        for (pattern, text, want) in rows {
            assert_eq!(Pattern::new(pattern).matches(text), *want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn action_matching_ignores_ascii_case() {
        let p = Pattern::new("functions:get*");
        assert!(p.matches_ignore_ascii_case("Functions:GetFunction"));
        assert!(!p.matches("functions:GetFunction"));
        assert!(!p.matches_ignore_ascii_case("functions:ListFunctions"));
    }

    #[test]
    fn no_backtracking_blowup() {
        let text = "a".repeat(10_000);
        let pattern = Pattern::new(&format!("{}b", "*a".repeat(50)));
        let start = std::time::Instant::now();
        assert!(!pattern.matches(&text));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn variables_are_literal_and_escapes_work() {
        let vars = Vars(&[("nimbus:username", "al*ce"), ("nimbus:userid", "42")]);
        let p = Pattern::with_vars("home/${nimbus:username}/*").unwrap();
        assert_eq!(p.matches_with("home/al*ce/x", false, &vars), Some(true));
        // The `*` in the user name is literal, not a wildcard.
        assert_eq!(p.matches_with("home/alice/x", false, &vars), Some(false));
        let p = Pattern::with_vars("u/${nimbus:UserId}").unwrap();
        assert_eq!(p.matches_with("u/42", false, &vars), Some(true));
        let p = Pattern::with_vars("${nimbus:missing}").unwrap();
        assert_eq!(p.matches_with("", false, &vars), None);
        let p = Pattern::with_vars("a${*}b${?}c${$}").unwrap();
        assert!(p.matches("a*b?c$"));
        assert!(!p.matches("axbycz"));
        assert!(!p.has_wildcards());
        let empty = Vars(&[("nimbus:empty", "")]);
        let p = Pattern::with_vars("a*${nimbus:empty}*b").unwrap();
        assert_eq!(p.matches_with("ab", false, &empty), Some(true));
        assert_eq!(p.matches_with("axb", false, &empty), Some(true));
        let p = Pattern::literal_with_vars("a*b").unwrap();
        assert!(p.matches("a*b") && !p.matches("axb"));
        assert_eq!(Pattern::with_vars("x${nimbus:a").unwrap_err(), VariableError::Unterminated(1));
        assert!(matches!(Pattern::with_vars("${}"), Err(VariableError::BadName(_))));
        assert!(matches!(Pattern::with_vars("${a b}"), Err(VariableError::BadName(_))));
        assert!(Pattern::new("$x${y}").matches("$x${y}"));
    }
}
