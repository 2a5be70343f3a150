-- The period end whose upcoming-renewal notice (and card-expiring warning,
-- when the card ends first) are all queued, set once they are and cleared
-- when the payment method changes. The partial index holds the renewable
-- subscriptions still owed those notices, so the daily notice scan reads
-- the few that come due instead of walking its whole 30-day window with two
-- outbox probes a row (renewd bench, "time travel").
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS notified_period_end timestamptz;
CREATE INDEX IF NOT EXISTS subscriptions_notice ON subscriptions (current_period_end)
    WHERE status = 'active' AND auto_renew AND payment_kind = 'card' AND NOT cancel_at_period_end
      AND notified_period_end IS DISTINCT FROM current_period_end;
