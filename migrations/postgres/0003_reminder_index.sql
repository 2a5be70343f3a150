-- The subscriptions the daily reminder scan reads: active, auto-renewal
-- off, not cancelling, by period end. The scan otherwise walks
-- `subscriptions_due` over every active subscription whose period ends
-- within the reminder window (30 days by default), most of them renewing
-- automatically, reading each row to test its flags.
CREATE INDEX IF NOT EXISTS subscriptions_remind ON subscriptions (current_period_end)
    WHERE status = 'active' AND NOT auto_renew AND NOT cancel_at_period_end;
