"""One object per reactor (per class): what connections on the same reactor share."""


class PerReactor:
    """A subclass's ``of(reactor)`` gives its one instance for that reactor,
    made with ``cls(reactor)`` on first use (tests run many reactors: clocks)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._by_reactor = {}

    @classmethod
    def of(cls, reactor):
        instance = cls._by_reactor.get(id(reactor))
        if instance is None or instance.reactor is not reactor:
            instance = cls._by_reactor[id(reactor)] = cls(reactor)
        return instance

    def __init__(self, reactor):
        self.reactor = reactor
