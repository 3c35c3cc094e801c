-- Rooms get an auto-increment id the first time the persister sees them; the sweeper walks
-- them by id in chunks.
CREATE TABLE IF NOT EXISTS rooms (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(128) NOT NULL,
  created_at BIGINT NOT NULL,
  last_message_at BIGINT NULL,
  UNIQUE KEY uq_rooms_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The archive. `id` is the server message id (ULID): its unique key makes every insert
-- idempotent. A room lives in one Kafka partition, so (room_id, kafka_offset) orders a room.
CREATE TABLE IF NOT EXISTS messages (
  seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  id CHAR(26) CHARACTER SET ascii NOT NULL,
  room_id BIGINT UNSIGNED NOT NULL,
  kafka_partition SMALLINT UNSIGNED NOT NULL,
  kafka_offset BIGINT UNSIGNED NOT NULL,
  user_id VARCHAR(255) NOT NULL,
  client_msg_id VARCHAR(128) NOT NULL DEFAULT '',
  body MEDIUMTEXT NOT NULL,
  created_at BIGINT NOT NULL,
  UNIQUE KEY uq_messages_id (id),
  KEY ix_messages_room_position (room_id, kafka_offset),
  KEY ix_messages_room_time (room_id, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
