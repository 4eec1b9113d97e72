-- One row per track event, with the visitor it belongs to.
select
    id as event_id,
    anonymous_id,
    user_id,
    coalesce(user_id, anonymous_id) as visitor_id,
    event_text as event_name,
    event as event_table,
    "timestamp" as tstamp,
    context_page_path as page_path,
    context_user_agent as user_agent,
    received_at
from {{ source('collector', 'tracks') }}
