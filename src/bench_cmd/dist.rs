//! The choices a load generator makes: which chat (uniform or Zipf), which operation
//! (the `--mix` weights), and parsing their flags.

use std::fmt;

use rand::Rng;

/// How chats are chosen for each operation (`--distribution`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    /// Every chat equally likely.
    Uniform,
    /// Chat of rank k (1-based, in creation order) with probability ∝ 1/k^s.
    Zipf { s: f64 },
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform => write!(f, "uniform"),
            Distribution::Zipf { s } => write!(f, "zipf:{s}"),
        }
    }
}

/// Default Zipf exponent for `--distribution zipf`.
pub const ZIPF_S_DEFAULT: f64 = 1.0;

/// Parses `uniform`, `zipf` or `zipf:S` (S > 0).
pub fn parse_distribution(s: &str) -> Result<Distribution, String> {
    match s {
        "uniform" => Ok(Distribution::Uniform),
        "zipf" => Ok(Distribution::Zipf { s: ZIPF_S_DEFAULT }),
        _ => {
            let exp = s
                .strip_prefix("zipf:")
                .ok_or_else(|| format!("{s:?} is not uniform, zipf or zipf:S"))?;
            let exp: f64 = exp
                .parse()
                .map_err(|_| format!("{exp:?} is not a number (zipf:S)"))?;
            if !(exp > 0.0 && exp <= 10.0) {
                return Err(format!("zipf exponent {exp} must be in (0, 10]"));
            }
            Ok(Distribution::Zipf { s: exp })
        }
    }
}

/// Draws chat indexes `0..n` from a [`Distribution`].
#[derive(Debug, Clone)]
pub struct ChatPicker {
    n: usize,
    /// Zipf only: cumulative probabilities, `cdf[k]` = P(index ≤ k); the last is 1.
    cdf: Option<Vec<f64>>,
}

impl ChatPicker {
    /// A picker over `n ≥ 1` chats.
    pub fn new(n: usize, distribution: Distribution) -> ChatPicker {
        assert!(n > 0, "at least one chat");
        let cdf = match distribution {
            Distribution::Uniform => None,
            Distribution::Zipf { s } => {
                let weights: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = weights
                    .iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect();
                // Rounding must not leave a draw of 0.999… past the end.
                if let Some(last) = cdf.last_mut() {
                    *last = 1.0;
                }
                Some(cdf)
            }
        };
        ChatPicker { n, cdf }
    }

    /// One draw.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        match &self.cdf {
            None => rng.random_range(0..self.n),
            Some(cdf) => {
                let u: f64 = rng.random();
                cdf.partition_point(|&c| c <= u).min(self.n - 1)
            }
        }
    }
}

/// An operation of the `mixed` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// Post a message.
    Send,
    /// Read the newest page of a chat.
    History,
    /// Catch a chat up from the last seq this worker saw.
    Sync,
}

impl OpKind {
    /// The name used in flags, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Send => "send",
            OpKind::History => "history",
            OpKind::Sync => "sync",
        }
    }
}

/// The `--mix` weights: `send=80,history=15,sync=5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    /// (kind, weight), weights > 0, kinds distinct.
    pub weights: Vec<(OpKind, u32)>,
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(k, w)| format!("{}={w}", k.name()))
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

impl Mix {
    /// One draw, proportional to the weights.
    pub fn pick(&self, rng: &mut impl Rng) -> OpKind {
        let total: u32 = self.weights.iter().map(|(_, w)| w).sum();
        let mut x = rng.random_range(0..total);
        for (kind, w) in &self.weights {
            if x < *w {
                return *kind;
            }
            x -= w;
        }
        self.weights[self.weights.len() - 1].0
    }
}

/// Parses `send=80,history=15,sync=5` (any subset, weights 0 to 1,000,000; at least one
/// non-zero).
pub fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut weights: Vec<(OpKind, u32)> = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not KIND=WEIGHT"))?;
        let kind = match name.trim() {
            "send" => OpKind::Send,
            "history" => OpKind::History,
            "sync" => OpKind::Sync,
            other => return Err(format!("unknown kind {other:?} (send, history, sync)")),
        };
        let w: u32 = w
            .trim()
            .parse()
            .ok()
            .filter(|w| *w <= 1_000_000)
            .ok_or_else(|| format!("weight {w:?} of {name} is not 0 to 1000000"))?;
        if weights.iter().any(|(k, _)| *k == kind) {
            return Err(format!("{name} is given twice"));
        }
        if w > 0 {
            weights.push((kind, w));
        }
    }
    if weights.is_empty() {
        return Err("the mix needs at least one non-zero weight".into());
    }
    Ok(Mix { weights })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn zipf_prefers_low_ranks_and_stays_in_range() {
        let picker = ChatPicker::new(100, Distribution::Zipf { s: 1.2 });
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[picker.pick(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[9] && counts[9] > counts[99]);
        // P(rank 1) = 1 / H(100, 1.2) ≈ 0.2775.
        assert!((26_500..29_000).contains(&counts[0]), "{}", counts[0]);
    }

    #[test]
    fn uniform_covers_every_chat() {
        let picker = ChatPicker::new(10, Distribution::Uniform);
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = [false; 10];
        for _ in 0..1_000 {
            seen[picker.pick(&mut rng)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_distribution("uniform"), Ok(Distribution::Uniform));
        assert_eq!(
            parse_distribution("zipf:0.9"),
            Ok(Distribution::Zipf { s: 0.9 })
        );
        assert!(parse_distribution("zipf:-1").is_err());
        assert!(parse_distribution("pareto").is_err());
        let mix = parse_mix("send=80,history=15,sync=5").unwrap();
        assert_eq!(mix.to_string(), "send=80,history=15,sync=5");
        assert!(parse_mix("send=1,send=2").is_err());
        assert!(parse_mix("send=0").is_err());
        assert!(parse_mix("post=3").is_err());
    }
}
