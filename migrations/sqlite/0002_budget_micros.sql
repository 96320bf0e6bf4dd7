-- The consumption budget keeps microseconds (a refill interval of 1.5 ms must not round to 1 ms).
UPDATE consume_budgets SET tat = tat * 1000;
ALTER TABLE consume_budgets RENAME COLUMN tat TO tat_us;
