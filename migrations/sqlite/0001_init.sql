-- renewd schema, SQLite. Instants are INTEGER unix seconds (UTC); calendar
-- dates are TEXT YYYY-MM-DD; money is INTEGER minor units plus a currency code.

CREATE TABLE customers (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    email       TEXT    NOT NULL,
    timezone    TEXT    NOT NULL,
    locale      TEXT    NOT NULL CHECK (locale IN ('en', 'ja')),
    country     TEXT    NOT NULL,
    currency    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE subscriptions (
    id                      INTEGER PRIMARY KEY,
    customer_id             INTEGER NOT NULL REFERENCES customers(id),
    plan                    TEXT    NOT NULL,
    status                  TEXT    NOT NULL CHECK (status IN ('pending_payment', 'active', 'past_due', 'expired', 'cancelled')),
    auto_renew              INTEGER NOT NULL CHECK (auto_renew IN (0, 1)),
    auto_renew_can_enable   INTEGER NOT NULL CHECK (auto_renew_can_enable IN (0, 1)),
    -- The purchase date in the customer's zone; period n ends on anchor + n years.
    anchor_date             TEXT,
    -- n of the current period's end (1 after purchase, 2 after the first renewal, ...).
    term                    INTEGER NOT NULL DEFAULT 0,
    current_period_start    INTEGER,
    current_period_end      INTEGER,
    payment_kind            TEXT    NOT NULL CHECK (payment_kind IN ('card', 'bank_transfer')),
    card_token              TEXT,
    card_brand              TEXT,
    card_last4              TEXT,
    card_expiry             TEXT,
    contact_name            TEXT,
    contact_phone           TEXT,
    contact_email           TEXT,
    terms_acceptance_id     INTEGER REFERENCES terms_acceptances(id),
    cancel_at_period_end    INTEGER NOT NULL DEFAULT 0,
    cancelled_at            INTEGER,
    created_at              INTEGER NOT NULL,
    updated_at              INTEGER NOT NULL
);
-- The due-work queries read (status, current_period_end): proportional to the work due.
CREATE INDEX subscriptions_due ON subscriptions (status, current_period_end);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id);

CREATE TABLE terms_acceptances (
    id              INTEGER PRIMARY KEY,
    customer_id     INTEGER NOT NULL REFERENCES customers(id),
    subscription_id INTEGER,
    version         TEXT    NOT NULL,
    accepted_at     INTEGER NOT NULL,
    context         TEXT    NOT NULL
);

-- One row per period to be paid: the purchase (term 1) and each renewal.
-- Unique on (subscription, period_start) so a sweep run twice, or by two
-- instances, makes one.
CREATE TABLE renewals (
    id                  INTEGER PRIMARY KEY,
    subscription_id     INTEGER NOT NULL REFERENCES subscriptions(id),
    kind                TEXT    NOT NULL CHECK (kind IN ('purchase', 'auto', 'manual')),
    period_start        INTEGER NOT NULL,
    term                INTEGER NOT NULL,
    -- awaiting_transfer: an open invoice was issued for a bank transfer.
    status              TEXT    NOT NULL CHECK (status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer', 'succeeded', 'failed', 'skipped')),
    attempt_count       INTEGER NOT NULL DEFAULT 0,
    first_attempt_at    INTEGER,
    next_attempt_at     INTEGER,
    lease_token         TEXT,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    terms_acceptance_id INTEGER REFERENCES terms_acceptances(id),
    -- For a manual renewal: auto-renewal after it is paid (1 on, 0 kept off).
    auto_renew_after    INTEGER,
    outcome_note        TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    UNIQUE (subscription_id, period_start)
);
CREATE INDEX renewals_due ON renewals (next_attempt_at) WHERE status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer');

-- Every call to the gateway, committed before the call is made.
CREATE TABLE payment_attempts (
    id                  INTEGER PRIMARY KEY,
    renewal_id          INTEGER NOT NULL REFERENCES renewals(id),
    attempt_no          INTEGER NOT NULL,
    idempotency_key     TEXT    NOT NULL UNIQUE,
    payment_method      TEXT    NOT NULL,
    amount_minor        INTEGER NOT NULL CHECK (amount_minor > 0),
    currency            TEXT    NOT NULL,
    -- The invoice this charge pays, computed before the call so the invoice
    -- always matches the amount charged.
    invoice_draft       TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN ('pending', 'succeeded', 'declined', 'unknown', 'not_charged')),
    decline_kind        TEXT,
    decline_code        TEXT,
    gateway_reference   TEXT,
    reconcile_count     INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    completed_at        INTEGER,
    UNIQUE (renewal_id, attempt_no)
);

CREATE TABLE invoice_counters (
    series      TEXT    PRIMARY KEY,
    last_seq    INTEGER NOT NULL
);

CREATE TABLE invoices (
    id                  INTEGER PRIMARY KEY,
    number              TEXT    NOT NULL UNIQUE,
    series              TEXT    NOT NULL,
    seq                 INTEGER NOT NULL,
    subscription_id     INTEGER NOT NULL REFERENCES subscriptions(id),
    customer_id         INTEGER NOT NULL REFERENCES customers(id),
    renewal_id          INTEGER REFERENCES renewals(id),
    attempt_id          INTEGER UNIQUE REFERENCES payment_attempts(id),
    status              TEXT    NOT NULL CHECK (status IN ('open', 'paid', 'void')),
    currency            TEXT    NOT NULL,
    subtotal_minor      INTEGER NOT NULL,
    tax_minor           INTEGER NOT NULL,
    total_minor         INTEGER NOT NULL,
    issued_at           INTEGER NOT NULL,
    due_at              INTEGER,
    paid_at             INTEGER,
    period_start        INTEGER NOT NULL,
    period_end          INTEGER NOT NULL,
    payment_kind        TEXT    NOT NULL,
    payment_reference   TEXT,
    -- Snapshots taken at issue: seller, buyer, lines, taxes, payment method.
    document            TEXT    NOT NULL,
    UNIQUE (series, seq)
);
CREATE INDEX invoices_subscription ON invoices (subscription_id);

-- Issued invoices are never edited: an open one settles once (paid | void, with
-- its payment date and reference); nothing else ever changes.
CREATE TRIGGER invoices_immutable BEFORE UPDATE ON invoices
WHEN NEW.number IS NOT OLD.number OR NEW.seq IS NOT OLD.seq OR NEW.series IS NOT OLD.series
  OR NEW.total_minor IS NOT OLD.total_minor OR NEW.subtotal_minor IS NOT OLD.subtotal_minor
  OR NEW.tax_minor IS NOT OLD.tax_minor OR NEW.currency IS NOT OLD.currency
  OR NEW.document IS NOT OLD.document OR NEW.issued_at IS NOT OLD.issued_at
  OR NEW.subscription_id IS NOT OLD.subscription_id OR NEW.customer_id IS NOT OLD.customer_id
  OR NEW.renewal_id IS NOT OLD.renewal_id OR NEW.attempt_id IS NOT OLD.attempt_id
  OR NEW.period_start IS NOT OLD.period_start OR NEW.period_end IS NOT OLD.period_end
  OR NEW.payment_kind IS NOT OLD.payment_kind OR NEW.due_at IS NOT OLD.due_at
  -- Only an open invoice settles, once: its status, payment date and reference.
  OR (OLD.status <> 'open' AND (NEW.status IS NOT OLD.status OR NEW.paid_at IS NOT OLD.paid_at
      OR NEW.payment_reference IS NOT OLD.payment_reference))
BEGIN
    SELECT RAISE(ABORT, 'issued invoices are immutable');
END;
CREATE TRIGGER invoices_never_deleted BEFORE DELETE ON invoices
BEGIN
    SELECT RAISE(ABORT, 'issued invoices are never deleted');
END;

-- Mail to send, written in the transaction that caused it. Unique on
-- (subscription, period, kind, offset) so each notice exists once.
CREATE TABLE outbox (
    id                  INTEGER PRIMARY KEY,
    subscription_id     INTEGER NOT NULL REFERENCES subscriptions(id),
    customer_id         INTEGER NOT NULL REFERENCES customers(id),
    kind                TEXT    NOT NULL,
    period_key          INTEGER NOT NULL,
    offset_key          INTEGER NOT NULL DEFAULT 0,
    recipient           TEXT    NOT NULL,
    locale              TEXT    NOT NULL,
    invoice_number      TEXT,
    context             TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    next_attempt_at     INTEGER NOT NULL,
    lease_token         TEXT,
    lease_expires_at    INTEGER,
    created_at          INTEGER NOT NULL,
    sent_at             INTEGER,
    UNIQUE (subscription_id, period_key, kind, offset_key)
);
CREATE INDEX outbox_queued ON outbox (next_attempt_at) WHERE status = 'queued';

-- The audit log: every money and mail action, oldest first.
CREATE TABLE events (
    id                  INTEGER PRIMARY KEY,
    at                  INTEGER NOT NULL,
    kind                TEXT    NOT NULL,
    subscription_id     INTEGER,
    customer_id         INTEGER,
    invoice_number      TEXT,
    amount_minor        INTEGER,
    currency            TEXT,
    period_end          INTEGER,
    idempotency_key     TEXT,
    outcome             TEXT,
    detail              TEXT
);
CREATE INDEX events_subscription ON events (subscription_id, id);

-- Support requests (cancellation goes through one).
CREATE TABLE requests (
    id                  INTEGER PRIMARY KEY,
    subscription_id     INTEGER NOT NULL REFERENCES subscriptions(id),
    kind                TEXT    NOT NULL CHECK (kind IN ('cancel')),
    status              TEXT    NOT NULL CHECK (status IN ('open', 'in_progress', 'resolved', 'rejected')),
    reason              TEXT    NOT NULL,
    resolution          TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    resolved_at         INTEGER
);
CREATE INDEX requests_subscription ON requests (subscription_id);
