//! Placement facts for the machine to rank by: the capacity failures this
//! process saw lately (by instance type, zone and capacity kind, kept
//! [`SHORTAGE_MEMORY`], after Karpenter's unavailable-offerings cache),
//! and for spot the placement scores, the recent spot prices and the
//! on-demand price (the Price List API, cached per process).
//!
//! Invariant: finding placement never fails and never decides. A call that
//! is denied, unsupported or failing becomes a gap in the facts (and a
//! warning); the machine ranks, and without facts keeps the config order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_pricing::types::{Filter as PriceFilter, FilterType};

use super::api::Ec2Api;
use super::sdk::Measured;
use crate::clock::{Clock, SystemClock};
use crate::lock;
use crate::machine::{Input, MicroUsd, PlacementFacts, SessionContext, ShortZone, Timestamp};

/// How long a capacity failure steers launches of the same instance type
/// and capacity kind away from its zone.
pub const SHORTAGE_MEMORY: Duration = Duration::from_secs(180);

/// What placement needs beside the EC2 calls, shared by every session of a
/// process.
pub struct PlacementSources {
    pub shortages: RecentShortages,
    pub prices: OnDemandPrices,
    pub clock: Arc<dyn Clock>,
}

impl PlacementSources {
    /// A copy with what this one knows so far (for a change of settings
    /// once the sources are shared).
    pub fn copy(&self) -> PlacementSources {
        PlacementSources {
            shortages: RecentShortages {
                seen: Mutex::new(lock(&self.shortages.seen).clone()),
            },
            prices: OnDemandPrices {
                client: self.prices.client.clone(),
                found: Mutex::new(lock(&self.prices.found).clone()),
            },
            clock: Arc::clone(&self.clock),
        }
    }
}

impl Default for PlacementSources {
    fn default() -> PlacementSources {
        PlacementSources {
            shortages: RecentShortages::default(),
            prices: OnDemandPrices::new(None),
            clock: Arc::new(SystemClock),
        }
    }
}

type OfferingKey = (String, String, bool);

/// Capacity failures by (instance type, zone, spot), with when they were seen.
#[derive(Default)]
pub struct RecentShortages {
    seen: Mutex<HashMap<OfferingKey, Timestamp>>,
}

impl RecentShortages {
    pub fn note(&self, instance_type: &str, zone: &str, spot: bool, now: Timestamp) {
        let mut seen = lock(&self.seen);
        seen.insert((instance_type.to_string(), zone.to_string(), spot), now);
    }

    /// The zones among `zones` where `instance_type` ran short within
    /// [`SHORTAGE_MEMORY`] of `now`, spot and on-demand alike.
    pub fn short_zones(
        &self,
        instance_type: &str,
        zones: &[String],
        now: Timestamp,
    ) -> Vec<ShortZone> {
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| now < at.plus(SHORTAGE_MEMORY));
        let mut short: Vec<ShortZone> = seen
            .keys()
            .filter(|(t, zone, _)| t == instance_type && zones.contains(zone))
            .map(|(_, zone, spot)| ShortZone {
                zone: zone.clone(),
                spot: *spot,
            })
            .collect();
        // A checkpoint must not depend on a hash map's order.
        short.sort_by(|a, b| (&a.zone, a.spot).cmp(&(&b.zone, b.spot)));
        short
    }
}

/// Why an on-demand price is not known; savings are then reported as
/// unknown, and placement goes on without them.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("no Price List client is configured")]
    NoClient,
    #[error("GetProducts: cannot build the filter: {0}")]
    Filter(#[source] aws_sdk_pricing::error::BuildError),
    #[error(transparent)]
    Call(#[from] super::api::Ec2Failure),
    #[error(
        "the Price List API lists no on-demand price for {instance_type} ({os}) in {region}; \
         check the instance type is offered there"
    )]
    NotListed {
        instance_type: String,
        os: &'static str,
        region: String,
    },
}

/// On-demand prices from the AWS Price List API, by (instance type,
/// region, operating system); a price, once found, is kept for the process.
pub struct OnDemandPrices {
    client: Option<aws_sdk_pricing::Client>,
    found: Mutex<HashMap<(String, String, String), MicroUsd>>,
}

impl OnDemandPrices {
    /// `None`: no Price List client, so savings stay unknown.
    pub fn new(client: Option<aws_sdk_pricing::Client>) -> OnDemandPrices {
        OnDemandPrices {
            client,
            found: Mutex::new(HashMap::new()),
        }
    }

    /// The hourly on-demand price of `instance_type` (shared tenancy, no
    /// pre-installed software), or why it is not known.
    pub async fn price(
        &self,
        instance_type: &str,
        region: &str,
        platform: Option<&str>,
    ) -> Result<MicroUsd, PriceError> {
        let os = operating_system(platform);
        let key = (
            instance_type.to_string(),
            region.to_string(),
            os.to_string(),
        );
        if let Some(price) = self.lock().get(&key) {
            return Ok(*price);
        }
        let Some(client) = &self.client else {
            return Err(PriceError::NoClient);
        };
        let term = |field: &str, value: &str| {
            PriceFilter::builder()
                .r#type(FilterType::TermMatch)
                .field(field)
                .value(value)
                .build()
                .map_err(PriceError::Filter)
        };
        let out = client
            .get_products()
            .service_code("AmazonEC2")
            .format_version("aws_v1")
            .filters(term("instanceType", instance_type)?)
            .filters(term("regionCode", region)?)
            .filters(term("operatingSystem", os)?)
            .filters(term("tenancy", "Shared")?)
            .filters(term("preInstalledSw", "NA")?)
            .filters(term("capacitystatus", "Used")?)
            .max_results(10)
            .send()
            .measured("GetProducts")
            .await?;
        let price = out
            .price_list()
            .iter()
            .find_map(|product| on_demand_price(product))
            .ok_or_else(|| PriceError::NotListed {
                instance_type: instance_type.to_string(),
                os,
                region: region.to_string(),
            })?;
        self.lock().insert(key, price);
        Ok(price)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), MicroUsd>> {
        lock(&self.found)
    }
}

/// The Price List's `operatingSystem` for an image's `PlatformDetails`.
fn operating_system(platform: Option<&str>) -> &'static str {
    match platform.unwrap_or("Linux/UNIX") {
        p if p.starts_with("Windows") => "Windows",
        p if p.starts_with("Red Hat") => "RHEL",
        p if p.starts_with("SUSE") => "SUSE",
        p if p.starts_with("Ubuntu Pro") => "Ubuntu Pro",
        _ => "Linux",
    }
}

/// The spot price history's product description for a platform.
fn product_description(platform: Option<&str>) -> &str {
    match platform {
        Some(p) if !p.is_empty() => p,
        _ => "Linux/UNIX",
    }
}

/// The first non-zero hourly on-demand price in one Price List product
/// (a JSON document: `terms.OnDemand.*.priceDimensions.*.pricePerUnit.USD`).
fn on_demand_price(product: &str) -> Option<MicroUsd> {
    let doc: serde_json::Value = serde_json::from_str(product).ok()?;
    let terms = doc.get("terms")?.get("OnDemand")?.as_object()?;
    terms
        .values()
        .filter_map(|term| term.get("priceDimensions")?.as_object())
        .flat_map(|dims| dims.values())
        .filter_map(|dim| MicroUsd::parse(dim.get("pricePerUnit")?.get("USD")?.as_str()?))
        .find(|price| price.0 > 0)
}

/// What [`crate::machine::Effect::FindPlacement`] asks.
pub struct PlacementQuery<'a> {
    pub spot: bool,
    pub zones: &'a [String],
    pub zone_ids: &'a [String],
    pub platform: Option<&'a str>,
}

/// Gathers the facts; each call that fails leaves a gap and a warning.
pub async fn find(
    api: &impl Ec2Api,
    sources: &PlacementSources,
    ctx: &SessionContext,
    query: PlacementQuery<'_>,
) -> Input {
    let instance_type = ctx.request.instance_type.as_str();
    let now = sources.clock.now();
    let mut facts = PlacementFacts {
        short_zones: sources
            .shortages
            .short_zones(instance_type, query.zones, now),
        ..PlacementFacts::default()
    };
    if !query.spot {
        return Input::PlacementFound {
            facts: Box::new(facts),
        };
    }
    let mut distinct: Vec<&String> = query.zones.iter().filter(|z| !z.is_empty()).collect();
    distinct.sort();
    distinct.dedup();
    let zones: Vec<String> = distinct.iter().map(|z| z.to_string()).collect();
    let region = api.region();
    // Scores only matter when there is a choice of zones.
    let scores = async {
        if zones.len() < 2 {
            return Ok(HashMap::new());
        }
        api.spot_placement_scores(instance_type).await
    };
    let prices = api.spot_prices(instance_type, product_description(query.platform), &zones);
    let on_demand = sources.prices.price(instance_type, &region, query.platform);
    let (scores, prices, on_demand) = tokio::join!(scores, prices, on_demand);
    match scores {
        // Scores come by zone id; the machine ranks by zone name.
        Ok(by_id) => {
            for (zone, id) in query.zones.iter().zip(query.zone_ids) {
                if let Some(score) = by_id.get(id) {
                    facts.scores.insert(zone.clone(), *score);
                }
            }
        }
        Err(failure) => facts.gaps.push(format!("{failure}")),
    }
    match prices {
        Ok(prices) => facts.spot_prices = prices.into_iter().collect(),
        Err(failure) => facts.gaps.push(format!("{failure}")),
    }
    match on_demand {
        Ok(price) => facts.on_demand_price = Some(price),
        Err(why) => facts.on_demand_gap = Some(why.to_string()),
    }
    for gap in &facts.gaps {
        tracing::warn!(%gap, "spot placement fact missing: subnets keep their config order");
    }
    Input::PlacementFound {
        facts: Box::new(facts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortage_is_remembered_for_three_minutes_per_type_zone_and_kind() {
        let cache = RecentShortages::default();
        let zones = ["us-east-1a".to_string(), "us-east-1b".to_string()];
        let t0 = Timestamp(1_000_000);
        cache.note("t3.micro", "us-east-1a", true, t0);
        cache.note("m5.large", "us-east-1b", true, t0);
        let short = cache.short_zones("t3.micro", &zones, t0.plus(Duration::from_secs(179)));
        assert_eq!(
            short,
            [ShortZone {
                zone: "us-east-1a".into(),
                spot: true
            }]
        );
        assert!(
            cache
                .short_zones("t3.micro", &zones, t0.plus(SHORTAGE_MEMORY))
                .is_empty()
        );
    }

    #[test]
    fn the_price_list_product_document_yields_its_hourly_price() {
        let product = r#"{"product":{"attributes":{"instanceType":"t3.micro"}},
            "terms":{"OnDemand":{"X.JRTCKXETXF":{"priceDimensions":{"X.JRTCKXETXF.6YS6EN2CT7":
            {"unit":"Hrs","pricePerUnit":{"USD":"0.0104000000"}}}}}}}"#;
        assert_eq!(on_demand_price(product), Some(MicroUsd(10_400)));
        assert_eq!(on_demand_price("not json"), None);
        assert_eq!(on_demand_price(r#"{"terms":{}}"#), None);
        assert_eq!(operating_system(Some("Red Hat Enterprise Linux")), "RHEL");
        assert_eq!(operating_system(None), "Linux");
    }
}
