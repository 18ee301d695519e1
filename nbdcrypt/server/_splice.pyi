def splice_payload(
    sock: int,
    pipe_r: int,
    pipe_w: int,
    pipe_size: int,
    null_fd: int,
    fd: int,
    offset: int,
    length: int,
    /,
) -> int: ...
