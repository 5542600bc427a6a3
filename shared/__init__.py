"""The wire protocol shared by the teacher server and the student trainer."""
