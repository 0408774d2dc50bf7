//! Where to launch, and what spot saves: the facts placement gathered
//! (placement scores, spot prices, the on-demand price, recent capacity
//! failures) and the pure rules that rank the configured subnets by them.
//!
//! Invariants: a ranking is a permutation of the configured subnets, a
//! function of the checkpointed facts alone, so a resumed session tries
//! the same subnets in the same order (and so derives the same
//! `ClientToken`s); missing facts never block a launch, they only leave
//! the config order in place.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// US dollars per hour, in millionths: EC2 and the Price List print prices
/// to six decimals, and integers keep checkpoints exact.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct MicroUsd(pub u64);

impl MicroUsd {
    /// Parses `"0.0104000000"` as EC2 and the Price List write it; `None`
    /// for anything else (negative, not a number, absurdly large).
    pub fn parse(text: &str) -> Option<MicroUsd> {
        let text = text.trim();
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) || whole.len() > 9 {
            return None;
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut micros = 0u64;
        for (i, b) in fraction.bytes().take(6).enumerate() {
            micros += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
        }
        Some(MicroUsd(whole * 1_000_000 + micros))
    }

    pub fn as_dollars(self) -> f64 {
        self.0 as f64 / 1_000_000.0
    }
}

impl fmt::Display for MicroUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}.{:06}/h", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// A zone where a launch of this instance type failed for want of
/// capacity a short while ago (in this process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortZone {
    pub zone: String,
    pub spot: bool,
}

/// What placement found out before the first launch. Every part may be
/// missing; `gaps` says why, for the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PlacementFacts {
    /// GetSpotPlacementScores (1–10, higher is likelier) by zone name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, u8>,
    /// The latest spot price by zone name (DescribeSpotPriceHistory).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spot_prices: BTreeMap<String, MicroUsd>,
    /// The on-demand price of the instance type in the region (Price List).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_price: Option<MicroUsd>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub short_zones: Vec<ShortZone>,
    /// Why a fact is missing: an API denied, unsupported or failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<String>,
    /// Why the on-demand price is missing, for "savings unknown".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_gap: Option<String>,
}

impl PlacementFacts {
    fn is_short(&self, zone: &str, spot: bool) -> bool {
        self.short_zones
            .iter()
            .any(|s| s.spot == spot && s.zone == zone)
    }

    /// Whether spot just ran out in every configured zone.
    pub fn spot_short_everywhere(&self, zones: &[String]) -> bool {
        !zones.is_empty() && zones.iter().all(|zone| self.is_short(zone, true))
    }

    /// Whether the facts can rank spot launches: both signals are in (a
    /// score without a price, or the reverse, keeps the config order).
    pub fn ranks_spot(&self) -> bool {
        !self.scores.is_empty() && !self.spot_prices.is_empty()
    }

    /// The order to try the `zones.len()` configured subnets in (indices
    /// into the config, best first). Spot: best placement score, then the
    /// lowest recent price, then config order; on-demand: config order.
    /// Either way, zones that just ran out of this capacity go last.
    pub fn order(&self, zones: &[String], subnet_count: usize, spot: bool) -> Vec<usize> {
        let zone = |i: usize| zones.get(i).map(String::as_str).unwrap_or("");
        let ranked = spot && self.ranks_spot();
        let mut order: Vec<usize> = (0..subnet_count).collect();
        order.sort_by_key(|&i| {
            let z = zone(i);
            let short = self.is_short(z, spot);
            let (score, price) = if ranked {
                (
                    self.scores.get(z).copied().unwrap_or(0),
                    self.spot_prices
                        .get(z)
                        .copied()
                        .unwrap_or(MicroUsd(u64::MAX)),
                )
            } else {
                (0, MicroUsd(0))
            };
            (short, std::cmp::Reverse(score), price, i)
        });
        order
    }

    /// One line for the log: what the order rests on.
    pub fn basis(&self, spot: bool) -> String {
        let short = if self.short_zones.iter().any(|s| s.spot == spot) {
            ", zones that just ran out of capacity last"
        } else {
            ""
        };
        if !spot {
            return format!("config order{short}");
        }
        if self.ranks_spot() {
            return format!("spot placement score, then recent spot price{short}");
        }
        format!("config order (no placement scores and prices to rank by){short}")
    }

    /// What running on spot in `zone` saves against on-demand, or why that
    /// is not known.
    pub fn savings_in(&self, zone: Option<&str>) -> SpotSavings {
        let spot_price = zone.and_then(|z| self.spot_prices.get(z)).copied();
        match (spot_price, self.on_demand_price) {
            (Some(spot_price), Some(on_demand_price)) if on_demand_price.0 > 0 => {
                let saved = on_demand_price.0 as i128 - spot_price.0 as i128;
                let tenths = saved * 1000 / on_demand_price.0 as i128;
                SpotSavings::Known {
                    spot_price,
                    on_demand_price,
                    savings_permille: i32::try_from(tenths).unwrap_or(i32::MIN),
                }
            }
            (None, _) => SpotSavings::Unknown {
                why: format!(
                    "no recent spot price for {}{}",
                    zone.unwrap_or("the instance's zone"),
                    self.price_gap("DescribeSpotPriceHistory")
                ),
            },
            (Some(_), _) => SpotSavings::Unknown {
                why: self
                    .on_demand_gap
                    .clone()
                    .unwrap_or_else(|| "the Price List API gave no on-demand price".into()),
            },
        }
    }

    fn price_gap(&self, action: &str) -> String {
        self.gaps
            .iter()
            .find(|g| g.contains(action))
            .map(|g| format!(" ({g})"))
            .unwrap_or_default()
    }
}

/// FR-036: what a spot instance saves, worked out when it is launched and
/// told when it is Ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "savings", rename_all = "snake_case")]
pub enum SpotSavings {
    Known {
        spot_price: MicroUsd,
        on_demand_price: MicroUsd,
        /// Saved share of the on-demand price, in tenths of a percent
        /// (negative if spot costs more).
        savings_permille: i32,
    },
    Unknown {
        why: String,
    },
}

impl SpotSavings {
    pub fn savings_percent(&self) -> Option<f64> {
        match self {
            SpotSavings::Known {
                savings_permille, ..
            } => Some(f64::from(*savings_permille) / 10.0),
            SpotSavings::Unknown { .. } => None,
        }
    }
}

impl fmt::Display for SpotSavings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpotSavings::Known {
                spot_price,
                on_demand_price,
                savings_permille,
            } => {
                let (sign, permille) = match *savings_permille {
                    p if p < 0 => ("-", -i64::from(p)),
                    p => ("", i64::from(p)),
                };
                write!(
                    f,
                    "spot {spot_price} against on-demand {on_demand_price}: {sign}{}.{}% saved",
                    permille / 10,
                    permille % 10
                )
            }
            SpotSavings::Unknown { why } => write!(f, "savings unknown: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones() -> Vec<String> {
        ["us-east-1a", "us-east-1b", "us-east-1c"]
            .map(String::from)
            .to_vec()
    }

    fn facts(scores: &[(&str, u8)], prices: &[(&str, u64)]) -> PlacementFacts {
        PlacementFacts {
            scores: scores.iter().map(|(z, s)| (z.to_string(), *s)).collect(),
            spot_prices: prices
                .iter()
                .map(|(z, p)| (z.to_string(), MicroUsd(*p)))
                .collect(),
            ..PlacementFacts::default()
        }
    }

    #[test]
    fn prices_parse_to_the_millionth_and_refuse_garbage() {
        assert_eq!(MicroUsd::parse("0.0104000000"), Some(MicroUsd(10_400)));
        assert_eq!(MicroUsd::parse("1.5"), Some(MicroUsd(1_500_000)));
        assert_eq!(MicroUsd::parse("3"), Some(MicroUsd(3_000_000)));
        assert_eq!(MicroUsd::parse(".25"), Some(MicroUsd(250_000)));
        for bad in ["", ".", "-0.1", "0.1.2", "abc", "1e5", "99999999999"] {
            assert_eq!(MicroUsd::parse(bad), None, "{bad:?}");
        }
        assert_eq!(MicroUsd(10_400).to_string(), "$0.010400/h");
    }

    #[test]
    fn spot_ranks_by_score_then_price_then_config_order() {
        let f = facts(
            &[("us-east-1a", 3), ("us-east-1b", 9), ("us-east-1c", 9)],
            &[("us-east-1a", 10), ("us-east-1b", 40), ("us-east-1c", 30)],
        );
        assert_eq!(f.order(&zones(), 3, true), [2, 1, 0]);
        // On-demand ignores spot facts.
        assert_eq!(f.order(&zones(), 3, false), [0, 1, 2]);
        // Equal scores and prices: config order.
        let tie = facts(
            &[("us-east-1a", 5), ("us-east-1b", 5)],
            &[("us-east-1a", 10), ("us-east-1b", 10)],
        );
        assert_eq!(tie.order(&zones(), 3, true), [0, 1, 2]);
    }

    #[test]
    fn one_missing_signal_keeps_the_config_order() {
        let no_scores = facts(&[], &[("us-east-1c", 1)]);
        assert_eq!(no_scores.order(&zones(), 3, true), [0, 1, 2]);
        let no_prices = facts(&[("us-east-1c", 9)], &[]);
        assert_eq!(no_prices.order(&zones(), 3, true), [0, 1, 2]);
        assert!(no_prices.basis(true).starts_with("config order"));
    }

    #[test]
    fn zones_that_just_ran_out_go_last_for_that_capacity_only() {
        let mut f = facts(
            &[("us-east-1a", 9), ("us-east-1b", 5)],
            &[("us-east-1a", 10), ("us-east-1b", 10)],
        );
        f.short_zones.push(ShortZone {
            zone: "us-east-1a".into(),
            spot: true,
        });
        assert_eq!(f.order(&zones(), 3, true), [1, 2, 0]);
        assert_eq!(f.order(&zones(), 3, false), [0, 1, 2]);
        f.short_zones[0].spot = false;
        assert_eq!(f.order(&zones(), 3, false), [1, 2, 0]);
        assert!(f.basis(false).contains("last"));
    }

    #[test]
    fn every_order_is_a_permutation_even_with_unknown_zones() {
        let f = facts(&[("us-east-1b", 9)], &[("us-east-1b", 5)]);
        let mut order = f.order(&["us-east-1b".to_string()], 4, true);
        assert_eq!(order[0], 0);
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3]);
    }

    #[test]
    fn savings_are_known_with_both_prices_and_say_why_without() {
        let mut f = facts(&[], &[("us-east-1a", 3_100)]);
        f.on_demand_price = Some(MicroUsd(10_400));
        let saved = f.savings_in(Some("us-east-1a"));
        assert_eq!(saved.savings_percent(), Some(70.1));
        let dearer = SpotSavings::Known {
            spot_price: MicroUsd(10_450),
            on_demand_price: MicroUsd(10_400),
            savings_permille: -5,
        };
        assert!(dearer.to_string().ends_with(": -0.5% saved"), "{dearer}");
        assert_eq!(
            saved.to_string(),
            "spot $0.003100/h against on-demand $0.010400/h: 70.1% saved"
        );
        f.on_demand_price = None;
        f.on_demand_gap = Some("GetProducts: AccessDeniedException: denied".into());
        assert_eq!(
            f.savings_in(Some("us-east-1a")).to_string(),
            "savings unknown: GetProducts: AccessDeniedException: denied"
        );
        f.gaps
            .push("DescribeSpotPriceHistory: InternalError".into());
        let unknown = f.savings_in(Some("us-east-1b")).to_string();
        assert!(
            unknown.contains("no recent spot price for us-east-1b"),
            "{unknown}"
        );
        assert!(unknown.contains("InternalError"), "{unknown}");
    }
}
