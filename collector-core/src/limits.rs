//! Size limits, the same as Segment's HTTP tracking API so clients that respect those
//! limits never see a rejection from us.

/// Largest accepted single event, in bytes of JSON (Segment: 32 KB per call).
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest accepted request body after decompression (Segment: 500 KB per batch request).
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;
/// Largest accepted request body before decompression. A gzip body can never expand to
/// something we accept from more than this, and it caps what we read off the wire.
pub const MAX_COMPRESSED_REQUEST_BYTES: usize = MAX_REQUEST_BYTES;
/// Longest accepted id (`messageId`, `anonymousId`, `userId`, `groupId`, `previousId`).
pub const MAX_ID_CHARS: usize = 512;
/// Most events accepted in one `/v1/batch` request.
pub const MAX_BATCH_EVENTS: usize = 2_500;
