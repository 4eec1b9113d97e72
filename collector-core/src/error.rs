//! Error types. Each variant knows its HTTP status and whether a retry can help, so the
//! edge maps errors in exactly one place.

use thiserror::Error;

/// Why one event was rejected. The `code` is a stable, machine-readable reason that is
/// also the drop-counter key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    #[error("event is not a JSON object")]
    NotAnObject,
    #[error("event is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("field `type` is missing")]
    MissingType,
    #[error("field `type` is {0:?}; expected one of track, page, identify, group, alias, screen")]
    UnknownType(String),
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("event has neither `anonymousId` nor `userId`")]
    MissingIdentity,
    #[error("field `{0}` is required for this event type")]
    MissingField(&'static str),
    #[error("field `{field}` is longer than {limit} characters")]
    FieldTooLong { field: &'static str, limit: usize },
    #[error("field `{field}` is not an ISO-8601 date-time: {value:?}")]
    BadTimestamp { field: &'static str, value: String },
    #[error("event is not valid JSON: {0}")]
    MalformedJson(String),
}

impl EventError {
    /// Stable reason code, used in responses and as the drop-counter key.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::NotAnObject => "not_an_object",
            EventError::TooLarge { .. } => "event_too_large",
            EventError::MissingType => "missing_type",
            EventError::UnknownType(_) => "unknown_type",
            EventError::WrongType { .. } => "wrong_type",
            EventError::MissingIdentity => "missing_identity",
            EventError::MissingField(_) => "missing_field",
            EventError::FieldTooLong { .. } => "field_too_long",
            EventError::BadTimestamp { .. } => "bad_timestamp",
            EventError::MalformedJson(_) => "malformed_json",
        }
    }

    /// HTTP status this rejection maps to when it decides a response.
    pub fn status(&self) -> u16 {
        match self {
            EventError::TooLarge { .. } => 413,
            _ => 400,
        }
    }
}

/// Why a whole request was rejected before any event could be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("request body is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body is not valid UTF-8")]
    NotUtf8,
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field `batch` is missing")]
    MissingBatch,
    #[error("batch has {count} events; the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("request body could not be decompressed: {0}")]
    BadEncoding(String),
    #[error("content encoding {0:?} is not supported; use gzip or none")]
    UnsupportedEncoding(String),
}

impl RequestError {
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::TooLarge { .. } => "request_too_large",
            RequestError::MalformedJson(_) => "malformed_json",
            RequestError::NotUtf8 => "not_utf8",
            RequestError::NotAnObject => "not_an_object",
            RequestError::WrongType { .. } => "wrong_type",
            RequestError::MissingBatch => "missing_batch",
            RequestError::TooManyEvents { .. } => "too_many_events",
            RequestError::BadEncoding(_) => "bad_encoding",
            RequestError::UnsupportedEncoding(_) => "unsupported_encoding",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            RequestError::TooLarge { .. } | RequestError::TooManyEvents { .. } => 413,
            RequestError::UnsupportedEncoding(_) => 415,
            _ => 400,
        }
    }
}

/// Batch codec failures. A decode error is never retryable: the bytes will not change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("blob is too short to be a batch ({0} bytes)")]
    TooShort(usize),
    #[error("blob does not start with the batch magic bytes")]
    BadMagic,
    #[error("batch format version {0} is not supported by this build")]
    UnsupportedVersion(u8),
    #[error("batch checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("batch payload does not decode: {0}")]
    Payload(String),
    #[error("batch payload does not encode: {0}")]
    Encode(String),
}

/// Drain-API signature failures; all map to 401.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignError {
    #[error("request is not signed (missing {0} header)")]
    Missing(&'static str),
    #[error("signature header is malformed")]
    Malformed,
    #[error("request timestamp is {skew_s} s away from now; the window is {window_s} s")]
    Stale { skew_s: i64, window_s: i64 },
    #[error("signature does not match")]
    Mismatch,
}

impl SignError {
    pub fn status(&self) -> u16 {
        401
    }
}
