//! epoll: being written.
