-- On the master (service-db), in the users database.
CREATE PUBLICATION users_pub FOR TABLE users;
