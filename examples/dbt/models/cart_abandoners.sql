-- Visitors whose latest add to cart has no order after it: one row per visitor, with
-- what they left in the cart. Per-event tables carry each property as a typed column.
with adds as (
    select
        coalesce(user_id, anonymous_id) as visitor_id,
        "timestamp" as added_at,
        sku,
        price
    from {{ source('collector', 'product_added') }}
),
last_add as (
    select visitor_id, max(added_at) as last_added_at, count(*) as items_added
    from adds
    group by visitor_id
),
orders as (
    select coalesce(user_id, anonymous_id) as visitor_id, max("timestamp") as last_order_at
    from {{ source('collector', 'order_completed') }}
    group by 1
)
select
    l.visitor_id,
    l.last_added_at,
    l.items_added,
    (select sum(a.price) from adds a where a.visitor_id = l.visitor_id and a.added_at > coalesce(o.last_order_at, timestamp '1970-01-01')) as cart_value
from last_add l
left join orders o on o.visitor_id = l.visitor_id
where o.last_order_at is null or o.last_order_at < l.last_added_at
