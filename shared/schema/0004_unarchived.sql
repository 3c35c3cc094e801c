-- Messages MySQL refused for their data (a field longer than its column, a value out of range: a
-- record no gateway writes, from a producer outside roomcast). The mover sets each aside here, whole
-- and with the reason, so one such row never holds up its room's archive; an operator decides.
-- (kafka_partition, kafka_offset) makes setting one aside again (a crash before the trim) a no-op.
CREATE TABLE IF NOT EXISTS unarchived_messages (
  seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  room_id BIGINT UNSIGNED NOT NULL,
  kafka_partition SMALLINT UNSIGNED NOT NULL,
  kafka_offset BIGINT UNSIGNED NOT NULL,
  entry MEDIUMTEXT NOT NULL,
  error VARCHAR(512) NOT NULL,
  set_aside_at BIGINT NOT NULL,
  UNIQUE KEY uq_unarchived_position (kafka_partition, kafka_offset)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
