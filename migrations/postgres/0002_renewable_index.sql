-- The subscriptions a sweep may open a renewal for, by payment kind and
-- period end. Opening due renewals otherwise walks `subscriptions_due` over
-- every active subscription whose period ends within the bank-transfer lead
-- (30 days by default), reading each row to test its payment kind and flags.
CREATE INDEX IF NOT EXISTS subscriptions_renewable ON subscriptions (payment_kind, current_period_end)
    WHERE status = 'active' AND auto_renew AND NOT cancel_at_period_end;
