-- renewd schema, PostgreSQL. The same tables and meaning as
-- migrations/sqlite/0001_init.sql, in native types: instants are timestamptz
-- (whole seconds, as renewd writes them), calendar dates are date, ids are
-- bigint identities, flags are boolean, money is bigint minor units plus a
-- currency code.
--
-- Several daemons share this database. The due-work indexes are partial, so
-- a claim or a scan reads the rows that are due, not the whole history.

CREATE TABLE customers (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    email       text        NOT NULL,
    timezone    text        NOT NULL,
    locale      text        NOT NULL CHECK (locale IN ('en', 'ja')),
    country     text        NOT NULL,
    currency    text        NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE subscriptions (
    id                      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id             bigint      NOT NULL REFERENCES customers(id),
    plan                    text        NOT NULL,
    status                  text        NOT NULL CHECK (status IN ('pending_payment', 'active', 'past_due', 'expired', 'cancelled')),
    auto_renew              boolean     NOT NULL,
    auto_renew_can_enable   boolean     NOT NULL,
    -- The purchase date in the customer's zone; period n ends on anchor + n years.
    anchor_date             date,
    -- n of the current period's end (1 after purchase, 2 after the first renewal, ...).
    term                    bigint      NOT NULL DEFAULT 0 CHECK (term >= 0),
    current_period_start    timestamptz,
    current_period_end      timestamptz,
    payment_kind            text        NOT NULL CHECK (payment_kind IN ('card', 'bank_transfer')),
    card_token              text,
    card_brand              text,
    card_last4              text,
    card_expiry             text,
    contact_name            text,
    contact_phone           text,
    contact_email           text,
    terms_acceptance_id     bigint,
    cancel_at_period_end    boolean     NOT NULL DEFAULT false,
    cancelled_at            timestamptz,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    CHECK (current_period_end IS NULL OR current_period_start IS NULL OR current_period_end > current_period_start)
);
-- The due-work queries read (status, current_period_end): a range of the
-- index per status holds exactly the periods that have ended, so a scan
-- costs what is due, however many expired or cancelled rows pile up.
CREATE INDEX subscriptions_due ON subscriptions (status, current_period_end);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id);

CREATE TABLE terms_acceptances (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id     bigint      NOT NULL REFERENCES customers(id),
    subscription_id bigint      REFERENCES subscriptions(id),
    version         text        NOT NULL,
    accepted_at     timestamptz NOT NULL,
    context         text        NOT NULL
);
CREATE INDEX terms_acceptances_version ON terms_acceptances (version);

ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_terms_acceptance_fk
    FOREIGN KEY (terms_acceptance_id) REFERENCES terms_acceptances(id);

-- One row per period to be paid: the purchase (term 1) and each renewal.
-- Unique on (subscription, period_start) so a sweep run twice, or by two
-- instances, makes one.
CREATE TABLE renewals (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id     bigint      NOT NULL REFERENCES subscriptions(id),
    kind                text        NOT NULL CHECK (kind IN ('purchase', 'auto', 'manual')),
    period_start        timestamptz NOT NULL,
    term                bigint      NOT NULL CHECK (term >= 1),
    -- awaiting_transfer: an open invoice was issued for a bank transfer.
    status              text        NOT NULL CHECK (status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer', 'succeeded', 'failed', 'skipped')),
    attempt_count       bigint      NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    first_attempt_at    timestamptz,
    next_attempt_at     timestamptz,
    -- The claim: who holds the renewal (host:pid) and until when (on the
    -- renewd Clock). Every write checks lease_token.
    lease_token         text,
    lease_owner         text,
    lease_expires_at    timestamptz,
    terms_acceptance_id bigint      REFERENCES terms_acceptances(id),
    -- For a manual renewal: auto-renewal after it is paid (true on, false kept off).
    auto_renew_after    boolean,
    outcome_note        text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    UNIQUE (subscription_id, period_start),
    CHECK ((lease_token IS NULL) = (lease_expires_at IS NULL))
);
-- Claims read open renewals in (next_attempt_at, id) order: only open rows
-- are indexed, so a claim costs what is due, not the table's history.
CREATE INDEX renewals_due ON renewals (next_attempt_at, id)
    WHERE status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer');

-- Every call to the gateway, committed before the call is made.
CREATE TABLE payment_attempts (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    renewal_id          bigint      NOT NULL REFERENCES renewals(id),
    attempt_no          bigint      NOT NULL CHECK (attempt_no >= 1),
    idempotency_key     text        NOT NULL UNIQUE,
    payment_method      text        NOT NULL,
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    currency            text        NOT NULL,
    -- The invoice this charge pays, computed before the call so the invoice
    -- always matches the amount charged.
    invoice_draft       jsonb       NOT NULL,
    status              text        NOT NULL CHECK (status IN ('pending', 'succeeded', 'declined', 'unknown', 'not_charged')),
    decline_kind        text,
    decline_code        text,
    gateway_reference   text,
    reconcile_count     bigint      NOT NULL DEFAULT 0 CHECK (reconcile_count >= 0),
    created_at          timestamptz NOT NULL,
    completed_at        timestamptz,
    UNIQUE (renewal_id, attempt_no)
);
-- Charges whose outcome is not known yet (the unknown-charges gauge).
CREATE INDEX payment_attempts_open ON payment_attempts (renewal_id)
    WHERE status IN ('pending', 'unknown');

-- One row per invoice series; the paying transaction locks it (the upsert
-- in the store), so numbers are gap-free and strictly increasing.
CREATE TABLE invoice_counters (
    series      text    PRIMARY KEY,
    last_seq    bigint  NOT NULL CHECK (last_seq >= 1)
);

CREATE TABLE invoices (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number              text        NOT NULL UNIQUE,
    series              text        NOT NULL,
    seq                 bigint      NOT NULL CHECK (seq >= 1),
    subscription_id     bigint      NOT NULL REFERENCES subscriptions(id),
    customer_id         bigint      NOT NULL REFERENCES customers(id),
    renewal_id          bigint      REFERENCES renewals(id),
    attempt_id          bigint      UNIQUE REFERENCES payment_attempts(id),
    status              text        NOT NULL CHECK (status IN ('open', 'paid', 'void')),
    currency            text        NOT NULL,
    subtotal_minor      bigint      NOT NULL CHECK (subtotal_minor >= 0),
    tax_minor           bigint      NOT NULL CHECK (tax_minor >= 0),
    total_minor         bigint      NOT NULL,
    issued_at           timestamptz NOT NULL,
    due_at              timestamptz,
    paid_at             timestamptz,
    period_start        timestamptz NOT NULL,
    period_end          timestamptz NOT NULL,
    payment_kind        text        NOT NULL,
    payment_reference   text,
    -- Snapshots taken at issue: seller, buyer, lines, taxes, payment method.
    document            jsonb       NOT NULL,
    UNIQUE (series, seq),
    CHECK (total_minor = subtotal_minor + tax_minor)
);
CREATE INDEX invoices_subscription ON invoices (subscription_id);

-- Issued invoices are never edited: only the status may move (open -> paid | void).
CREATE FUNCTION invoices_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'issued invoices are never deleted';
    END IF;
    IF NEW.number IS DISTINCT FROM OLD.number OR NEW.seq IS DISTINCT FROM OLD.seq
       OR NEW.series IS DISTINCT FROM OLD.series
       OR NEW.total_minor IS DISTINCT FROM OLD.total_minor
       OR NEW.subtotal_minor IS DISTINCT FROM OLD.subtotal_minor
       OR NEW.tax_minor IS DISTINCT FROM OLD.tax_minor
       OR NEW.currency IS DISTINCT FROM OLD.currency
       OR NEW.document IS DISTINCT FROM OLD.document
       OR NEW.issued_at IS DISTINCT FROM OLD.issued_at
       OR NEW.subscription_id IS DISTINCT FROM OLD.subscription_id
       OR NEW.customer_id IS DISTINCT FROM OLD.customer_id
       OR NEW.renewal_id IS DISTINCT FROM OLD.renewal_id
       OR NEW.attempt_id IS DISTINCT FROM OLD.attempt_id
       OR NEW.period_start IS DISTINCT FROM OLD.period_start
       OR NEW.period_end IS DISTINCT FROM OLD.period_end
       OR NEW.payment_kind IS DISTINCT FROM OLD.payment_kind
       OR NEW.due_at IS DISTINCT FROM OLD.due_at
       -- Only an open invoice settles, once: its status, payment date and reference.
       OR (OLD.status <> 'open' AND (NEW.status IS DISTINCT FROM OLD.status
           OR NEW.paid_at IS DISTINCT FROM OLD.paid_at
           OR NEW.payment_reference IS DISTINCT FROM OLD.payment_reference)) THEN
        RAISE EXCEPTION 'issued invoices are immutable';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER invoices_immutable BEFORE UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_immutable();
CREATE TRIGGER invoices_never_deleted BEFORE DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_immutable();
CREATE TRIGGER invoices_never_truncated BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_immutable();

-- Mail to send, written in the transaction that caused it. Unique on
-- (subscription, period, kind, offset) so each notice exists once.
CREATE TABLE outbox (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id     bigint      NOT NULL REFERENCES subscriptions(id),
    customer_id         bigint      NOT NULL REFERENCES customers(id),
    kind                text        NOT NULL,
    -- The period the mail belongs to (its end, unix seconds): part of the key.
    period_key          bigint      NOT NULL,
    offset_key          bigint      NOT NULL DEFAULT 0,
    recipient           text        NOT NULL,
    locale              text        NOT NULL,
    invoice_number      text,
    context             jsonb       NOT NULL,
    status              text        NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    attempts            bigint      NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error          text,
    next_attempt_at     timestamptz NOT NULL,
    lease_token         text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL,
    sent_at             timestamptz,
    UNIQUE (subscription_id, period_key, kind, offset_key)
);
CREATE INDEX outbox_queued ON outbox (next_attempt_at, id) WHERE status = 'queued';

-- The audit log: every money and mail action, oldest first.
CREATE TABLE events (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                  timestamptz NOT NULL,
    kind                text        NOT NULL,
    subscription_id     bigint,
    customer_id         bigint,
    invoice_number      text,
    amount_minor        bigint,
    currency            text,
    period_end          timestamptz,
    idempotency_key     text,
    outcome             text,
    detail              jsonb
);
CREATE INDEX events_subscription ON events (subscription_id, id);

-- Support requests (cancellation goes through one).
CREATE TABLE requests (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id     bigint      NOT NULL REFERENCES subscriptions(id),
    kind                text        NOT NULL CHECK (kind IN ('cancel')),
    status              text        NOT NULL CHECK (status IN ('open', 'in_progress', 'resolved', 'rejected')),
    reason              text        NOT NULL,
    resolution          text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    resolved_at         timestamptz
);
CREATE INDEX requests_subscription ON requests (subscription_id);
CREATE INDEX requests_status ON requests (status);
