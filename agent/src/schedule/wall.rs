//! croner's search over jiff 1: [`Wall`], a zoned date-time that croner can walk.
//!
//! croner reads patterns on a civil (wall clock) calendar of its own and asks a date-time
//! library, through its `CronDateTime` trait, what a wall clock time is in a zone: one
//! instant, two (the clock went back) or none (it went forward). croner ships this for jiff
//! 0.2 only; corral uses jiff 1, so this is the same mapping for jiff 1's `ZonedDateTime`.

use std::cmp::Ordering;

use croner::errors::CronError;
use croner::{CivilDate, CivilDateTime, CivilTime, CronDateTime, Resolution, Weekday};
use jiff::civil::DateTime;
use jiff::tz::AmbiguousOffset;
use jiff::{SignedDuration, ZonedDateTime};

/// An instant with its time zone, as croner searches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Wall(pub ZonedDateTime);

/// jiff keeps every part in range, so croner's civil value is built unchecked.
fn to_civil(datetime: DateTime) -> CivilDateTime {
    CivilDateTime::new(
        CivilDate::from_parts_unchecked(
            i32::from(datetime.year()),
            datetime.month().unsigned_abs().into(),
            datetime.day().unsigned_abs().into(),
        ),
        CivilTime::from_parts_unchecked(
            datetime.hour().unsigned_abs().into(),
            datetime.minute().unsigned_abs().into(),
            datetime.second().unsigned_abs().into(),
        ),
    )
}

/// croner's civil value in jiff; fails outside jiff's years (-9999..=9999).
fn to_jiff(civil: CivilDateTime) -> Result<DateTime, CronError> {
    let part = |n: u32| i8::try_from(n).map_err(|_| CronError::InvalidDate);
    DateTime::new(
        i16::try_from(civil.year()).map_err(|_| CronError::InvalidDate)?,
        part(civil.month())?,
        part(civil.day())?,
        part(civil.hour())?,
        part(civil.minute())?,
        part(civil.second())?,
        0,
    )
    .map_err(|_| CronError::InvalidDate)
}

impl CronDateTime for Wall {
    fn to_civil(&self) -> CivilDateTime {
        to_civil(self.0.datetime())
    }

    fn civil_weekday(&self) -> Weekday {
        Weekday::from_days_from_sunday(
            self.0
                .weekday()
                .to_sunday_zero_offset()
                .unsigned_abs()
                .into(),
        )
    }

    fn resolve_civil(&self, civil: CivilDateTime) -> Result<Resolution<Self>, CronError> {
        let ambiguous = self
            .0
            .time_zone()
            .to_ambiguous_zoned_datetime(to_jiff(civil)?);
        let wall =
            |z: Result<ZonedDateTime, jiff::Error>| z.map(Wall).map_err(|_| CronError::InvalidTime);
        Ok(match ambiguous.offset() {
            AmbiguousOffset::Unambiguous { .. } => {
                Resolution::Single(wall(ambiguous.unambiguous())?)
            }
            AmbiguousOffset::Fold { .. } => {
                Resolution::Ambiguous(wall(ambiguous.clone().earlier())?, wall(ambiguous.later())?)
            }
            AmbiguousOffset::Gap { .. } => Resolution::Gap,
        })
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0
            .checked_add(SignedDuration::from_secs(seconds))
            .ok()
            .map(Wall)
    }

    fn cmp_instant(&self, other: &Self) -> Ordering {
        self.0.timestamp().cmp(&other.0.timestamp())
    }
}
