//! Cursor pagination for every list: `?limit=` (1–100, default 20) and `?after=<cursor>`,
//! where the cursor is opaque to clients and names the last item of the previous page.
//! Lists are ordered by UUIDv7 ids, which are time-ordered, so a cursor stays valid while
//! rows are added.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

/// Default page size.
pub const DEFAULT_LIMIT: i64 = 20;
/// Largest page size.
pub const MAX_LIMIT: i64 = 100;

/// Paging parameters of a list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1–100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub after: Option<String>,
}

impl PageParams {
    /// The checked page size and decoded cursor.
    pub fn parse(&self) -> Result<(i64, Option<Uuid>), ApiError> {
        Ok((self.limit()?, self.after()?))
    }

    /// The page size, checked.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::InvalidQuery(vec![FieldError::new(
                "limit",
                "range",
                format!("must be between 1 and {MAX_LIMIT}"),
            )])),
        }
    }

    /// The decoded cursor.
    pub fn after(&self) -> Result<Option<Uuid>, ApiError> {
        self.after.as_deref().map(decode_cursor).transpose()
    }
}

fn decode_cursor(s: &str) -> Result<Uuid, ApiError> {
    URL_SAFE_NO_PAD.decode(s).ok().and_then(|b| Uuid::from_slice(&b).ok()).ok_or_else(|| {
        ApiError::InvalidQuery(vec![FieldError::new("after", "cursor", "is not a cursor returned by this list")])
    })
}

/// Encodes an id as a cursor.
pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// A page of a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items, in list order.
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows (the extra row only tells that more exist).
    pub fn from_rows(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> Self {
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more { rows.last().map(|r| encode_cursor(id(r))) } else { None };
        Page { items: rows, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = Uuid::now_v7();
        let p = PageParams { limit: None, after: Some(encode_cursor(id)) };
        assert_eq!(p.after().unwrap(), Some(id));
        let bad = PageParams { limit: None, after: Some("nope".into()) };
        assert!(matches!(bad.after(), Err(ApiError::InvalidQuery(_))));
    }

    #[test]
    fn limits_are_bounded() {
        let l = |n| PageParams { limit: n, after: None }.limit();
        assert_eq!(l(None).unwrap(), 20);
        assert_eq!(l(Some(100)).unwrap(), 100);
        assert!(l(Some(0)).is_err());
        assert!(l(Some(101)).is_err());
    }

    #[test]
    fn pages_know_when_more_exist() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let p = Page::from_rows(ids.clone(), 2, |u| *u);
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.next_cursor, Some(encode_cursor(ids[1])));
        let last = Page::from_rows(ids[..2].to_vec(), 2, |u| *u);
        assert_eq!(last.next_cursor, None);
    }
}
