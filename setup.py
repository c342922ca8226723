from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / 'carrot' / '__init__.py').read_text(), version)

setup(
    name='django-carrot',
    version=version['__version__'],
    description='A task queue for Django projects on RabbitMQ, with every task recorded '
                'in the database.',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['carrot', 'carrot.*']),
    include_package_data=True,
    package_data={'carrot': ['py.typed', 'templates/**/*', 'static/**/*']},
    python_requires='>=3.11',
    install_requires=[
        'gevent>=24.2',
        'amqpstorm>=3.1,<3.2',
        'django>=5.2,<7',
        'python-daemon>=3.0',
        'cronsim>=2.6',
    ],
    extras_require={'postgresql': ['psycopg[binary]>=3.2'],
                    # Django's task framework on Django 5.2 (built into 6.0 and later)
                    'django-tasks': ['django-tasks>=0.12,<0.13']},
    classifiers=[
        'Framework :: Django',
        'Framework :: Django :: 5.2',
        'Framework :: Django :: 6.0',
        'Framework :: Django :: 6.1',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Typing :: Typed',
    ],
)
